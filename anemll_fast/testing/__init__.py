"""Test helpers shipped with anemll_fast: tiny random ANEMLL models and an independent numpy reference decoder."""

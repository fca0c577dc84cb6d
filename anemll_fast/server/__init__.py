"""`anemll-fast serve`: an OpenAI-compatible HTTP server (needs the [server] extra).

Modules: `schema` (request bodies), `pool` (models, the generation thread and
its queue), `app` (the HTTP API), `cli` (the subcommand). Importing this
package imports none of the server libraries.
"""

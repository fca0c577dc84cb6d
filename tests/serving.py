"""Start the real `anemll-fast serve` process on a free loopback port, for the server tests."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """The server's output goes to files, not pipes: a pipe nobody drains fills up and
    blocks the server's logging, which would hang every request."""

    def __init__(self, args: List[str], startup_timeout: float = 90.0) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._out = tempfile.NamedTemporaryFile("w+", suffix=".out", delete=False)
        self._err = tempfile.NamedTemporaryFile("w+", suffix=".err", delete=False)
        # Run from the repository root so that this checkout's package is the one imported.
        self.proc = subprocess.Popen([sys.executable, "-m", "anemll_fast", "serve", "--port", "0", *args],
                                     cwd=REPO, env=env, stdout=self._out, stderr=self._err, text=True)
        self.url = self._wait_for_url(startup_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = Path(self._out.name).read_text()
            if "listening on " in text:
                return text.split("listening on ", 1)[1].split()[0]
            time.sleep(0.1)
        log = self.stop()
        raise RuntimeError(f"the server did not start: {log[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """The server's stderr so far (its request log)."""
        return Path(self._err.name).read_text()

    def stop(self) -> str:
        """Stop the server; its whole stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        log = self.log()
        for f in (self._out, self._err):
            f.close()
            Path(f.name).unlink(missing_ok=True)
        return log

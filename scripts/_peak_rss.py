"""Run a command and report its own peak resident memory (``wait4`` rusage) on stderr.

python scripts/_peak_rss.py CMD ARGS...   → CMD's stdout/stderr, then ``peak_rss_mib=N`` and
``cpu_seconds=S`` (user + system time of CMD and its children)
"""

from __future__ import annotations

import os
import subprocess
import sys


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:])
    _, status, usage = os.wait4(proc.pid, 0)
    print(f"peak_rss_mib={usage.ru_maxrss / 1024:.1f}", file=sys.stderr)
    print(f"cpu_seconds={usage.ru_utime + usage.ru_stime:.1f}", file=sys.stderr)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())

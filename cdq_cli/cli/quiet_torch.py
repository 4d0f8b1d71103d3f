"""Imported before anything imports torch: torch's C++ logging (the connection retries of a
distributed rendezvous, say, with their stack frames) is noise next to cdq's one error line, so it
is limited to fatal messages unless the user set ``TORCH_CPP_LOG_LEVEL`` or ``CDQ_DEBUG``."""

import os

if os.environ.get("CDQ_DEBUG", "") in ("", "0"):
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

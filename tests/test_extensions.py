"""Adding a solver or an export format is one new module plus one entry in its registry: the entry
then shows up in ``--help``, ``cdq methods`` and the plan's checks with no other file touched.

Each check runs in a fresh interpreter that adds the entry to the registry before the rest of cdq
is imported (as a new entry in the registry's source would be), then asks the command line and
the plan about it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NEW_METHOD = """
import torch
from cdq_cli.solvers import registry
from cdq_cli.solvers.rtn import solve_rtn

def solve_halfway(weight, sigma, spec, *, shrink=0.5):
    return solve_rtn(weight, sigma, spec)

registry.METHODS["halfway"] = registry.Method(
    "halfway", solve_halfway, "a solver added by one entry", sweeps=1.0,
    options={"shrink": registry.Option("shrink", "float", low=0, high=1)},
)
"""

NEW_FORMAT = """
from cdq_cli.store import exports
from cdq_cli.store.exporting import ExportError, ExportFormat

def preflight(layers, *, skipped, method, model_type=None, kept=()):
    if method == "rtn":
        raise ExportError("the toy format refuses rtn")

def export(source, dest, *, overwrite, max_shard_bytes, flavour):
    raise ExportError(f"toy export of {source} ({flavour})")

exports.FORMATS["toy"] = ExportFormat(
    "toy", "-toy", "a format added by one entry", preflight, export, options={"flavour": ("plain", "fancy")}
)
"""


def _run(setup: str, body: str) -> dict:
    code = setup + "\nimport json\n" + body
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_method_entry_reaches_the_cli_and_the_plan(tmp_path: Path) -> None:
    found = _run(
        NEW_METHOD,
        f"""
import contextlib, io
from pathlib import Path
from cdq_cli.cli import main
from cdq_cli.run.plan import QuantizeRequest, settle
help_text, listing = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(help_text):
    main(["quantize", "--help"])
with contextlib.redirect_stdout(listing):
    main(["methods", "--json"])
plan = settle(QuantizeRequest("{tmp_path / "model"}", method="halfway", options={{"shrink": "0.25"}},
                              output=Path("{tmp_path / "out"}")))
try:
    bad = {{"shrink": "2"}}
    settle(QuantizeRequest("m", method="halfway", options=bad, output=Path("{tmp_path / "o2"}")))
    refused = None
except ValueError as exc:
    refused = str(exc)
listed = json.loads(listing.getvalue())["halfway"]
print(json.dumps({{"help": "halfway" in help_text.getvalue(), "methods": listed,
                  "options": plan.settings.options, "refused": refused}}))
""",
    )
    assert found["help"]
    assert found["methods"]["summary"] == "a solver added by one entry"
    assert (
        set(found["methods"]["options"]) == {"shrink"}
        and found["methods"]["options"]["shrink"]["default"] == 0.5
    )
    assert found["options"] == {"shrink": 0.25}
    assert found["refused"] is not None and "shrink" in found["refused"]


def test_a_new_format_entry_reaches_the_cli_and_the_plan(tmp_path: Path) -> None:
    found = _run(
        NEW_FORMAT,
        f"""
import contextlib, io
from pathlib import Path
from cdq_cli.cli import main
from cdq_cli.run.plan import QuantizeRequest, settle
from cdq_cli.store.exports import preflight, export
texts = []
for command in (["quantize", "--help"], ["export", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(command)
    texts.append(out.getvalue())
plan = settle(QuantizeRequest("m", export_format="toy", output=Path("{tmp_path / "out"}")))
refusals = []
for call in (lambda: preflight("toy", {{"a": ((4, 4), None)}}, skipped=[], method="rtn"),
             lambda: export("toy", "{tmp_path}", options={{"flavour": "odd"}}),
             lambda: export("toy", "{tmp_path}", options={{"checkpoint_format": "gptq"}}),
             lambda: export("toy", "{tmp_path}", options={{"flavour": "fancy"}})):
    try:
        call()
    except ValueError as exc:
        refusals.append(str(exc))
shown = ["toy" in text for text in texts]
print(json.dumps({{"help": shown, "dest": str(plan.export_dest), "refusals": refusals}}))
""",
    )
    assert found["help"] == [True, True]
    assert found["dest"] == str(tmp_path / "out-toy")
    refused_rtn, bad_value, foreign_option, reached = found["refusals"]
    assert refused_rtn == "the toy format refuses rtn"
    assert "flavour" in bad_value and "odd" in bad_value
    assert "--checkpoint-format" in foreign_option and "gptq" in foreign_option
    assert reached == f"toy export of {tmp_path} (fancy)"

"""python -m stackwise_ray.reference > docs/configuration.md

The configuration reference, written from the fields' own declarations (config.setting):
every key, its default, its meaning and what it does to a phase's identity. The test
suite checks that docs/configuration.md is what this prints, so a key cannot be missing
from it or stay in it after removal.
"""

from __future__ import annotations

import dataclasses
import sys

from .config import HASHED, IGNORED, PLANNED, TRUNK, StackWiseConfig

IDENTITY_WORDS = {HASHED: "yes", TRUNK: "from phase 1", PLANNED: "through the plans", IGNORED: "no"}
HEADER = """\
# Configuration reference

Written by `python -m stackwise_ray.reference` from the config's field declarations
(`stackwise_ray/config.py`); edit those, not this file. Every key is optional; unknown
keys are errors with a did-you-mean, and any key can be set on the command line
(`python -m stackwise_ray.train X.yaml training.lr=1e-3 ray.num_workers=2`, typed by
the schema) or swept (`tune.search_space`).

**Phase id** says what a key does to a phase's identity (`stackwise_ray/phase_store.py`),
so which finished phases a run or a trial may reuse:
- *yes*: it can change a phase's weights or the numbers it reports, and is hashed into every phase's id;
- *from phase 1*: it changes how a trunk is treated, and is hashed into the ids of phases 1, 2, ... (phase 0 is shared);
- *through the plans*: it reaches the ids through each stack's plan (blocks, precision, side, LoRA rank and
  alpha, time step, a cache dtype that rounds), so two configs whose plans agree share phases;
- *no*: it cannot change what a phase produces (`tests/test_phase_identity.py` trains both ways and compares the weights).
"""


def show_default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value}" if not isinstance(value, str) else value


def section_table(section, path: str) -> list[str]:
    lines = [f"## `{path}`", "", "| key | default | phase id | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((value, f"{path}.{f.name}"))
            continue
        meaning = f.metadata["doc"].replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{show_default(f)}` | {IDENTITY_WORDS[f.metadata['identity']]} | {meaning} |")
    lines.append("")
    for value, sub in nested:
        lines += section_table(value, sub)
    return lines


def reference() -> str:
    config = StackWiseConfig()
    lines = [HEADER]
    for f in dataclasses.fields(config):
        lines += section_table(getattr(config, f.name), f.name)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())

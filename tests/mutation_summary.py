"""`./dev mutate`'s summary of one module: reads mutmut's results in the
module's work directory (the current one), prints each surviving mutant not
judged equivalent (`tests/equivalent_mutants.toml`) with its diff, and records
the module's score in the scores file.

    python tests/mutation_summary.py MODULE SECONDS EQUIVALENTS_TOML SCORES_TSV
"""

import re
import sys
import tomllib
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

module, seconds, equivalents_file, scores_file = sys.argv[1:]
equivalents = tomllib.loads(Path(equivalents_file).read_text()).get(module, [])
KILLED = {"killed", "timeout", "caught by type check"}


def function_of(name: str) -> str:  # core.x.xǁClassǁmethod__mutmut_3 → Class.method
    mangled = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    return mangled[2:].replace("ǁ", ".") if mangled.startswith("xǁ") else mangled[2:]


def mutated_line(diff: str) -> str:  # the new line, or "without: " and the line dropped
    def lines(sign: str) -> str:
        return " ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith(sign + " "))

    return lines("+") or "without: " + lines("-")


counts = {"total": 0, "killed": 0, "equivalent": 0}
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    for name, code in sorted(data.exit_code_by_key.items()):
        status = status_by_exit_code[code]
        counts["total"] += 1
        if status in KILLED:
            counts["killed"] += 1
            continue
        diff = get_diff_for_mutant(name, path=path)
        line = mutated_line(diff)
        if any(e["function"] == function_of(name) and e["line"] == line for e in equivalents):
            counts["equivalent"] += 1
            continue
        print(f"{status}: {name}")
        print("".join(ln + "\n" for ln in diff.splitlines() if re.match(r"[-+] ", ln)))
judged = counts["total"] - counts["equivalent"]
score = 100 * counts["killed"] / judged if judged else 100.0
row = [
    module,
    f"{counts['killed']}/{judged}",
    f"{score:.1f}%",
    f"{counts['equivalent']} equivalent",
    f"{seconds}s",
]
print("score:", "  ".join(row))
scores = Path(scores_file)
lines = [
    ln
    for ln in (scores.read_text().splitlines() if scores.exists() else [])
    if not ln.startswith(module + "\t")
]
scores.write_text("".join(ln + "\n" for ln in sorted([*lines, "\t".join(row)])))

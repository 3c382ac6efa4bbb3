"""Print the GPU check's results as markdown: every JSON file in the folder, its scalar facts and its rows."""

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(folder: str) -> None:
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        print(f"\n## {path.stem}\n")
        facts = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
        for k, v in facts.items():
            print(f"- {k}: {v}")
        for key, value in data.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                print(f"\n{key}:\n\n{table(value)}")


if __name__ == "__main__":
    main(sys.argv[1])

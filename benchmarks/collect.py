"""Print a markdown table of the evaluations stored in distilled-set manifests.

Usage: python benchmarks/collect.py SET_DIR [SET_DIR ...]
"""

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    import ddkit

    print("| set | method | dataset | IPC | protocol / preset | runs | accuracy % (mean +- std) | distill s | eval s/run "
          "| image bytes | soft-label bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        distill = manifest.get("timings", {}).get("distill_seconds")
        sizes = ddkit.load(path).stored_bytes()
        for record in manifest.get("evaluations", []):
            print(f"| {Path(path).name} | {manifest['method']} | {manifest['dataset']} | {manifest['ipc']} | "
                  f"{record['protocol']} / {record['preset']} | {len(record['accuracies'])} | "
                  f"{record['mean']:.2f} +- {record['std']:.2f} | "
                  f"{'' if distill is None else f'{distill:.0f}'} | {record['seconds_per_run']:.0f} | "
                  f"{sizes['images']} | {sizes['soft_labels']} |")


if __name__ == "__main__":
    main(sys.argv[1:])

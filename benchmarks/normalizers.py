"""Expert vs random returns per task (the expert-normalized score's normalizers) of a dataset.

    .venv/bin/python benchmarks/normalizers.py data/default

Prints, per task, the scripted expert's and a uniform-random policy's mean return (± std) over
the episodes recorded in the dataset index, and the expert's margin over random.
"""

from __future__ import annotations

import argparse

from gato_like.data_pipelines.shards import read_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    args = parser.parse_args()
    index = read_index(args.dataset)
    print("| task | max steps | expert return | random return | episodes each | expert success (dataset) |")
    print("|---|---|---|---|---|---|")
    for task, entry in sorted(index["tasks"].items()):
        expert, random = entry["returns"]["expert"], entry["returns"]["random"]
        rnd = f"{random['mean']:.2f} ± {random['std']:.2f}" if random else "-"
        print(
            f"| {task} | {entry['max_steps']} | {expert['mean']:.2f} ± {expert['std']:.2f} | {rnd} | "
            f"{expert['episodes']} | {entry['success_rate']:.0%} |"
        )


if __name__ == "__main__":
    main()

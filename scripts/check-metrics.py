#!/usr/bin/python3
"""Check Prometheus text exposition with the prometheus_client library's own parser.

Reads the text on standard input (as `curl http://ADDR/metrics` prints it). Exits non-zero,
naming the problem, when the parser rejects it or a family has no TYPE; otherwise prints one
line per family, `# NAME TYPE` (a counter's NAME ends in _total, as its samples do), and one
per sample, NAME{LABEL="VALUE",...}<TAB>VALUE, labels sorted.
Needs Debian's python3-prometheus-client (run with /usr/bin/python3).
"""
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    if not text.strip():
        sys.exit("no metrics: the input is empty")
    lines = []
    try:
        for family in text_string_to_metric_families(text):
            if family.type == "unknown":
                sys.exit(f"metric family {family.name} has no # TYPE line")
            suffix = "_total" if family.type == "counter" else ""
            lines.append(f"# {family.name}{suffix} {family.type}")
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{s.name}{{{labels}}}\t{s.value!r}")
    except ValueError as e:
        sys.exit(f"invalid Prometheus text: {e}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Samples a Prometheus /metrics endpoint every second into a file, one `time name{labels} value`
line per sample of the series that show load and GPU telemetry, until killed.

    python bench/scrape_metrics.py http://127.0.0.1:8000/metrics out/metrics_scrape.txt &
"""

import sys
import time
import urllib.request

KEYS = ("gpu_", "num_requests_running", "num_requests_waiting", "kv_cache_usage",
        "generation_tokens_total")


def main() -> None:
    url, path = sys.argv[1], sys.argv[2]
    with open(path, "a") as out:
        while True:
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
                stamp = time.time()
                for line in text.splitlines():
                    if not line.startswith("#") and any(key in line for key in KEYS):
                        out.write(f"{stamp:.1f} {line}\n")
                out.flush()
            except OSError as error:
                out.write(f"{time.time():.1f} ERROR {error!r}\n")
            time.sleep(1)


if __name__ == "__main__":
    main()

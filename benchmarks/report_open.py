"""How long a report takes to open from disk in headless Chromium, and how large it is.

    python benchmarks/report_open.py runs/demo/report.html --repeat 5

Each opening loads the file (``file://``, no network), unpacks plotly.js and the data, and draws every
figure; the time is until the last figure has its SVG. The best and the median of ``--repeat``
openings are printed, after one opening to warm the browser up; then the median of ``--repeat``
runs of the page's unpacker (base 64 and gzip, undone by the browser) over plotly.js alone, on the
open page. Needs Debian's chromium and chromium-driver, as the browser test does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drawn = ("return Array.from(document.querySelectorAll('[data-figure]'))"
             ".every(d => d.querySelector('.main-svg'))")
    try:
        seconds = []
        for _ in range(args.repeat + 1):
            driver.get("about:blank")
            start = time.perf_counter()
            driver.get(args.report.resolve().as_uri())
            while not driver.execute_script(drawn):
                time.sleep(0.01)
            seconds.append(time.perf_counter() - start)
        unpack = [driver.execute_async_script(
            "var done = arguments[arguments.length - 1], t = performance.now();"
            "KS.unpack('ks-plotly').then(function(){done(performance.now() - t);});")
            for _ in range(args.repeat)]  # milliseconds
    finally:
        driver.quit()
    timed = seconds[1:]
    print(f"{args.report}: {args.report.stat().st_size / 1e6:.2f} MB")
    print(f"open until every figure is drawn: best {min(timed):.2f} s, "
          f"median {statistics.median(timed):.2f} s (of {len(timed)}); "
          f"unpacking plotly.js alone: median {statistics.median(unpack):.0f} ms (of {len(unpack)})")


if __name__ == "__main__":
    main()

"""The dashboard in a real browser: `xlab serve` over stores built by `xlab import`, driven by
Debian's headless Chromium over WebDriver (the browser the tests use).

- First paint of an experiment's view (its run table) at 10^4 and 10^5 jobs (sweep points of 5
  seeds each): from navigation start to the view in the page (`performance.mark("xlab:view")`).
- A filter change at 10^4 jobs: from setting the URL to the re-rendered view.
- 50 curves of 10^4 steps each: from navigation start to the view with its curves drawn, and the
  drawing alone (`xlab:chart`).
- A parallel-coordinates brush over the 10^4-job table: the update of the lines and the table
  (`xlab:brush`).

Bars (issue #24): 300 ms and 1 s; 300 ms; 500 ms; 100 ms. Each figure is the median of 5, with
the page opened again each time on the running `xlab serve` (which reads the store when it starts
and keeps what it read while nobody else opens the store); the time from starting `xlab serve` to
the first table is reported too.

    python bench/dashboard.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


class Browser:
    def __init__(self):
        port = free_port()
        self.driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        wait(lambda: connects(port), "chromedriver")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"]}}}}
        self.session = http("POST", f"{self.base}/session", caps)["value"]["sessionId"]

    def call(self, method, path, body=None):
        return http(method, f"{self.base}/session/{self.session}{path}", body)["value"]

    def js(self, script):
        return self.call("POST", "/execute/sync", {"script": script, "args": []})

    def open(self, url):
        self.call("POST", "/url", {"url": url})

    def until(self, script, what, limit=60):
        deadline = time.time() + limit
        while time.time() < deadline:
            v = self.js(script)
            if v:
                return v
            time.sleep(0.01)
        raise RuntimeError(f"no {what} within {limit} s")

    def close(self):
        try:
            http("DELETE", f"{self.base}/session/{self.session}")
        finally:
            self.driver.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait(ready, what, limit=30):
    deadline = time.time() + limit
    while not ready():
        if time.time() > deadline:
            raise RuntimeError(f"no {what}")
        time.sleep(0.05)


def write_sweep(path, name, points, seeds, steps):
    """`points` sweep points (distinct learning rates) × `seeds` jobs, 4 final metrics each and,
    with `steps`, a series `val.loss` of that many steps."""
    ids = []
    with open(path, "w") as f:
        jobs = []
        for p in range(points):
            lr = round(0.001 + p * 1e-5, 8)
            for seed in range(seeds):
                jid = f"{len(ids):016x}"
                ids.append(jid)
                summary = {"test.acc": 0.5 + (p % 97) / 200 + seed / 1000, "test.loss": 1.0 - (p % 89) / 200,
                           "test.ece": 0.05 + seed / 100, "val.acc": 0.5 + (p % 83) / 200}
                if steps:
                    curve = [[s, 1.0 / (s + p % 7 + 1) + seed / 1000] for s in range(1, steps + 1)]
                    summary["val.loss"] = curve[-1][1]
                    series = {"val.loss": curve}
                else:
                    series = {k: [[1, v]] for k, v in summary.items()}
                job = {"id": jid, "experiment": name, "stage": "train", "seed": seed,
                       "config": {"task": "train", "optimizer": {"name": "sgd", "lr": lr}},
                       "point": [["optimizer.lr", lr]], "parents": [], "status": "done", "attempts": [],
                       "summary": summary, "provenance": {"xlab_version": "bench", "libtorch": None, "host": None,
                                                          "device": None}, "artifacts": []}
                jobs.append(json.dumps({"type": "job", "job": job, "metrics": series}))
        f.write(json.dumps({"type": "experiment", "name": name, "file": f"{name}.yaml", "source": "",
                            "updated_unix": 0,
                            "stages": [{"name": "train", "sweep_keys": ["optimizer.lr"], "jobs": ids}]}) + "\n")
        f.write("\n".join(jobs) + "\n")


def serve(xlab, store):
    p = subprocess.Popen([xlab, "--store", store, "serve", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    return p, line.split(" at ")[1].strip()


FIRST_TABLE = "const m = performance.getEntriesByName('xlab:table'); return m.length > 0 && m[0].startTime"
FIRST_VIEW = "const m = performance.getEntriesByName('xlab:view'); return m.length > 0 && m[0].startTime"


def median_of(n, f):
    return statistics.median(f() for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sizes", default="10000,100000")
    args = ap.parse_args()
    xlab = os.path.abspath(args.xlab)
    rows = []
    browser = Browser()
    try:
        with tempfile.TemporaryDirectory() as work:
            for n in [int(s) for s in args.sizes.split(",")]:
                store = os.path.join(work, f"s{n}")
                lines = os.path.join(work, "in.jsonl")
                write_sweep(lines, "big", n // 5, 5, 0)
                subprocess.run([xlab, "--store", store, "import", lines], check=True, stdout=subprocess.DEVNULL)
                started = time.time()
                server, url = serve(xlab, store)
                try:
                    view = f"{url}#/exp/big?metrics=test.acc"
                    # The page opened as soon as `xlab serve` has printed its URL: it waits for the
                    # store to be read.
                    browser.open(view)
                    browser.until(FIRST_TABLE, "the table")
                    rows.append({"what": f"xlab serve started, the page opened at once: the table in the page, {n:,} jobs",
                                 "ms": (time.time() - started) * 1000, "bar_ms": None})
                    print(json.dumps(rows[-1]), flush=True)

                    def first_paint():
                        browser.open("about:blank")
                        browser.open(view)
                        return browser.until(FIRST_TABLE, "the table")

                    paint = median_of(5, first_paint)
                    table_rows = browser.js("return lastTable.rows.length")
                    rows.append({"what": f"first paint of the run table, {n:,} jobs ({table_rows:,} rows, the first 100 shown)",
                                 "ms": paint, "bar_ms": 300 if n <= 10_000 else 1000})
                    print(json.dumps(rows[-1]), flush=True)
                    if n == 10_000:
                        def refilter(k=[0]):
                            k[0] += 1
                            f = f"optimizer.lr < {0.001 + (k[0] % 5 + 1) * 0.002}"
                            t0 = browser.js(
                                "window.__marks = performance.getEntriesByName('xlab:view').length; "
                                "window.__t0 = performance.now(); "
                                f"location.hash = '#/exp/big?metrics=test.acc&filter=' + encodeURIComponent({json.dumps(f)}); "
                                "return window.__t0")
                            t1 = browser.until("const m = performance.getEntriesByName('xlab:view'); "
                                               "return m.length > window.__marks && m[m.length - 1].startTime",
                                               "the filtered table")
                            return t1 - t0

                        rows.append({"what": f"a filter change re-rendered, {n:,} jobs", "ms": median_of(5, refilter),
                                     "bar_ms": 300})
                        print(json.dumps(rows[-1]), flush=True)

                        def brush():
                            browser.open("about:blank")
                            browser.open(view)
                            browser.until(FIRST_VIEW, "the table")
                            browser.until("return document.querySelector('#parallel rect.axis')", "the axes")
                            return browser.js(
                                "performance.clearMeasures('xlab:brush');"
                                "const hit = document.querySelector('#parallel rect.axis[data-axis=\"optimizer.lr\"]');"
                                "const r = hit.getBoundingClientRect(); const x = r.left + r.width / 2;"
                                "hit.dispatchEvent(new MouseEvent('mousedown', {clientX: x, clientY: r.top + 2, bubbles: true}));"
                                "window.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: r.top + r.height * 0.5}));"
                                "const m = performance.getEntriesByName('xlab:brush');"
                                "window.dispatchEvent(new MouseEvent('mouseup', {clientX: x, clientY: r.top + r.height * 0.5}));"
                                "return m[m.length - 1].duration")

                        rows.append({"what": f"a parallel-coordinates brush, {n:,} jobs ({table_rows:,} lines)",
                                     "ms": median_of(5, brush), "bar_ms": 100})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    server.kill()
            # 50 curves × 10^4 steps.
            store = os.path.join(work, "curves")
            lines = os.path.join(work, "curves.jsonl")
            write_sweep(lines, "long", 50, 1, 10_000)
            subprocess.run([xlab, "--store", store, "import", lines], check=True, stdout=subprocess.DEVNULL)
            server, url = serve(xlab, store)
            try:
                def curves():
                    browser.open("about:blank")
                    browser.open(f"{url}#/exp/long?metric=val.loss&metrics=test.acc")
                    browser.until("return document.querySelectorAll('#chart polyline.curve').length === 50", "the curves")
                    return browser.js("const v = performance.getEntriesByName('xlab:view')[0].startTime;"
                                      "const c = performance.getEntriesByName('xlab:chart')[0].duration; return [v, c]")

                got = [curves() for _ in range(5)]
                rows.append({"what": "50 curves × 10,000 steps: navigation to drawn", "ms": statistics.median(g[0] for g in got),
                             "bar_ms": 500})
                rows.append({"what": "50 curves × 10,000 steps: the drawing alone", "ms": statistics.median(g[1] for g in got),
                             "bar_ms": 500})
                print(json.dumps(rows[-2:]), flush=True)
            finally:
                server.kill()
    finally:
        browser.close()
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "browser": subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip(),
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dashboard.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

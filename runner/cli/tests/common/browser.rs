//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`), and
//! plain HTTP/1.1 requests: for the tests of `xlab serve` and of `xlab report`'s pages.

use super::wait_for;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request; the status and the body.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(authority).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req += &format!("Host: {authority}\r\n");
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).unwrap();
    // The head, then the body by its length (a server may keep the connection open).
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head += &line;
    }
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let length =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let body = if let Some(n) = length {
        let mut buf = vec![0; n];
        reader.read_exact(&mut buf).unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    } else if lower.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            reader.read_exact(&mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    } else {
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        rest
    };
    (status, body)
}

pub fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = http("GET", url, &[], None);
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

pub fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| names.iter().map(|n| PathBuf::from("/usr/bin").join(n)).find(|p| p.exists());
    Some((find(&["chromium", "chromium-browser"])?, find(&["chromedriver"])?))
}

/// A headless Chromium session over WebDriver.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http("DELETE", &format!("{}/session/{}", self.base, self.session), &[], None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    pub fn start(chromium: &Path, driver: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1280,1000"]}}}});
        let (status, body) = http("POST", &format!("{base}/session"), &[], Some(&caps.to_string()));
        assert_eq!(status, 200, "no browser session: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser { driver, base, session }
    }

    pub fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let (status, text) = http(method, &url, &[], (method == "POST").then(|| body.to_string()).as_deref());
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["value"].clone()
    }

    pub fn open(&self, url: &str) {
        self.call("POST", "/url", serde_json::json!({ "url": url }));
    }

    pub fn js(&self, script: &str) -> serde_json::Value {
        self.call("POST", "/execute/sync", serde_json::json!({"script": script, "args": []}))
    }

    /// Waits until `script` returns something truthy, and returns it.
    pub fn until(&self, what: &str, script: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.js(script);
            if !(v.is_null() || v == false || v == 0 || v == "" || v.as_array().is_some_and(Vec::is_empty)) {
                return v;
            }
            assert!(Instant::now() < deadline, "no {what} in the page");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clears the element `css` finds and types `keys` into it. The page may re-render the
    /// element between finding and typing (a live refresh): a stale element is found again.
    pub fn type_into(&self, css: &str, keys: &str) {
        for attempt in 0.. {
            let found = self.call("POST", "/element", serde_json::json!({"using": "css selector", "value": css}));
            let id = found.as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
            let post = |what: &str, body: serde_json::Value| {
                let url = format!("{}/session/{}/element/{id}/{what}", self.base, self.session);
                http("POST", &url, &[], Some(&body.to_string()))
            };
            let mut stale = false;
            for (what, body) in [("clear", serde_json::json!({})), ("value", serde_json::json!({ "text": keys }))] {
                let (status, text) = post(what, body);
                if status == 404 && text.contains("stale element reference") && attempt < 5 {
                    stale = true;
                    break;
                }
                assert_eq!(status, 200, "POST /element/{id}/{what}: {text}");
            }
            if !stale {
                return;
            }
        }
    }

    pub fn screenshot(&self, to: &Path) {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", serde_json::Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

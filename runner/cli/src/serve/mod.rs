//! `xlab serve`: a local web dashboard over the store. It reads the store (through the owner's
//! socket while a run holds it, so a sweep can be watched live) and never writes to it; the
//! page's script and style are compiled into the binary, nothing is fetched from elsewhere.
//!
//! Security: it binds 127.0.0.1 unless told otherwise, and any other address needs a token that
//! every request carries (`--token`, or one it makes up and prints). Requests whose `Host` is not
//! the address it serves are refused (DNS rebinding). Artifacts are served only from the store's
//! run folders. Every response forbids inline script (Content-Security-Policy), and the page
//! builds its text with `textContent`, never as HTML.

mod api;
mod cache;

use crate::common::*;
use crate::Cli;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The address to listen on; anything but a loopback address needs a token.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The token every request must carry (`?token=` in the URL, or `Authorization: Bearer`).
    /// Required off loopback; made up and printed when not given there.
    #[arg(long)]
    pub token: Option<String>,
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// What every response says about itself: no inline script, nothing from elsewhere, not framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn run(cli: &Cli, args: &ServeArgs) -> Result<u8, Failure> {
    let token = match (&args.token, args.bind.is_loopback()) {
        (Some(t), _) if t.len() < 16 => {
            return Err(user_error("a `--token` must be at least 16 characters long".into()));
        }
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => Some(made_up_token()),
    };
    let addr = SocketAddr::new(args.bind, args.port);
    let server = tiny_http::Server::http(addr).map_err(|e| {
        let hint = if e.to_string().contains("in use") {
            format!("another program listens on port {}; pick another with `--port`", args.port)
        } else {
            "check `--bind` and `--port`".to_string()
        };
        user_error(format!("cannot listen on {addr}: {e}\n  hint: {hint}"))
    })?;
    let host = if args.bind.is_unspecified() { "127.0.0.1".to_string() } else { args.bind.to_string() };
    let url = match &token {
        Some(t) => format!("http://{host}:{}/?token={t}", server.server_addr().to_ip().map_or(args.port, |a| a.port())),
        None => format!("http://{host}:{}/", server.server_addr().to_ip().map_or(args.port, |a| a.port())),
    };
    if !cli.store.join("db").is_dir() {
        eprintln!(
            "note: there is no xlab store at {} yet; the dashboard shows it once `xlab run FILE --store {}` makes one",
            cli.store.display(),
            cli.store.display()
        );
    }
    outln!("xlab dashboard of store {} at {url}", cli.store.display());
    let state = State { store: cli.store.clone(), token, bind: args.bind, cache: Mutex::new(cache::Cache::default()) };
    std::thread::scope(|scope| {
        // Reads every experiment's records now, so that the first page does not wait for them.
        scope.spawn(|| with_store(&state, None, api::warm));
        for _ in 0..4 {
            scope.spawn(|| {
                while let Ok(request) = server.recv() {
                    handle(&state, request);
                }
            });
        }
    });
    Ok(0)
}

struct State {
    store: PathBuf,
    token: Option<String>,
    bind: IpAddr,
    /// One store access at a time: the dashboard opens the store for a request when it needs to
    /// and lets go of it after, so that a run can start (and own it) between requests; what it
    /// read is kept while nobody else opens the store.
    cache: Mutex<cache::Cache>,
}

fn made_up_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A response: status, content type and body.
#[derive(Clone)]
pub(crate) struct Reply {
    status: u16,
    kind: &'static str,
    body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(v: &serde_json::Value) -> Reply {
        Reply { status: 200, kind: "application/json", body: serde_json::to_vec(v).expect("json") }
    }

    pub(crate) fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(&serde_json::json!({"error": message.into()})).with_status(status)
    }

    fn with_status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }
}

fn handle(state: &State, mut request: tiny_http::Request) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let params = parse_query(query);
    let header = |name: &str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.to_string())
    };
    let reply = if !host_allowed(state, header("Host").as_deref()) {
        Reply::error(403, "this dashboard answers requests addressed to its own address only")
    } else if !token_ok(state, &params, header("Authorization").as_deref()) {
        Reply::error(401, "this dashboard needs its token: open the URL `xlab serve` printed (it has `?token=…`)")
    } else if request.method() != &tiny_http::Method::Get {
        let mut sink = Vec::new();
        let _ = request.as_reader().take(1 << 16).read_to_end(&mut sink);
        Reply::error(405, "the dashboard only reads: GET requests only")
    } else {
        route(state, path, &params)
    };
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    for (k, v) in [
        ("Content-Type", reply.kind),
        ("Content-Security-Policy", CSP),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ] {
        response.add_header(tiny_http::Header::from_bytes(k, v).expect("valid header"));
    }
    let _ = request.respond(response);
}

fn route(state: &State, path: &str, params: &[(String, String)]) -> Reply {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // An answer that depends on the store's state only is kept under its path and parameters.
    let mut asked: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "token").collect();
    asked.sort();
    let key = format!("{path}?{asked:?}");
    match path {
        "/" | "/index.html" => Reply { status: 200, kind: "text/html; charset=utf-8", body: INDEX.into() },
        "/app.js" => Reply { status: 200, kind: "text/javascript; charset=utf-8", body: APP_JS.into() },
        "/app.css" => Reply { status: 200, kind: "text/css; charset=utf-8", body: APP_CSS.into() },
        "/api/experiments" => with_store(state, None, api::experiments),
        "/api/running" => with_store(state, None, api::running_now),
        "/api/table" => {
            with_store(state, Some(&key), |s| api::table(s, get("exp"), get("with"), get("filter"), get("metrics")))
        }
        "/api/grouped" => with_store(state, Some(&key), |s| {
            let ask = api::GroupedAsk {
                exp: get("exp"),
                filter: get("filter"),
                metrics: get("metrics"),
                group_by: get("group_by"),
                agg: get("agg"),
                compare_to: get("compare_to"),
                test: get("test"),
                sort: get("gsort"),
            };
            api::grouped(s, &ask)
        }),
        "/api/curves" => with_store(state, Some(&key), |s| {
            // 100 curves unless asked for more (a plot of 10^4 lines helps nobody).
            let limit = get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
            api::curves(s, get("exp"), get("with"), get("filter"), get("metric"), limit)
        }),
        "/api/compare" => {
            with_store(state, Some(&key), |s| api::compare(s, get("a").unwrap_or(""), get("b").unwrap_or("")))
        }
        "/api/job" => with_store(state, None, |s| api::job(s, get("id").unwrap_or(""))),
        "/api/artifact" => with_store(state, None, |s| artifact(s, get("id").unwrap_or(""), get("path").unwrap_or(""))),
        _ => Reply::error(404, format!("no page `{path}` here; the dashboard is at /")),
    }
}

/// Runs `f` on the store as this request reads it (see [`cache`]); an answer under `key` is
/// kept, and given again while the store is unchanged.
fn with_store(state: &State, key: Option<&str>, f: impl FnOnce(&cache::Reader) -> Result<Reply, Failure>) -> Reply {
    let mut kept = state.cache.lock().unwrap_or_else(|e| e.into_inner());
    if !state.store.join("db").is_dir() {
        return Reply::error(
            404,
            format!(
                "there is no xlab store at {} yet: `xlab run FILE --store {}` makes one, and this page shows it then",
                state.store.display(),
                state.store.display()
            ),
        );
    }
    kept.check(&state.store);
    if let Some(reply) = key.and_then(|k| kept.reply(k)) {
        return reply;
    }
    let reader = cache::Reader::new(&state.store, &mut kept);
    let reply = match f(&reader) {
        Ok(r) => r,
        Err(e) => Reply::error(if e.code == exit::USER { 400 } else { 500 }, format!("{:#}", e.error)),
    };
    let live = reader.live();
    reader.finish();
    if let (Some(k), false, true) = (key, live, reply.status < 500) {
        kept.keep_reply(k.to_string(), reply.clone());
    }
    reply
}

/// Serves a file of a job's run folder: `path` relative to it, with no way out of it (no `..`,
/// no absolute path, no symlink that leads elsewhere).
fn artifact(store: &cache::Reader, id: &str, path: &str) -> Result<Reply, Failure> {
    use xlab_store::ResultStore;
    let refuse = |m: &str| Ok(Reply::error(403, m.to_string()));
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refuse("a job id is hexadecimal");
    }
    let rel = Path::new(path);
    if path.is_empty() || rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return refuse("an artifact's path is relative to its job's run folder, without `..`");
    }
    let dir = store.run_dir(id);
    let (Ok(root), Ok(file)) = (dir.canonicalize(), dir.join(rel).canonicalize()) else {
        return Ok(Reply::error(404, format!("job {id} has no file `{path}`")));
    };
    if !file.starts_with(&root) || !file.is_file() {
        return refuse("that file is not in the job's run folder");
    }
    let kind = match file.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("txt" | "log" | "jsonl" | "csv") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    let body = std::fs::read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    Ok(Reply { status: 200, kind, body })
}

fn host_allowed(state: &State, host: Option<&str>) -> bool {
    if !state.bind.is_loopback() {
        // Off loopback the token guards every request.
        return true;
    }
    let Some(host) = host else { return false };
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    matches!(name, "127.0.0.1" | "localhost" | "[::1]") || name == state.bind.to_string()
}

fn token_ok(state: &State, params: &[(String, String)], authorization: Option<&str>) -> bool {
    let Some(want) = &state.token else { return true };
    let given = params
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.as_str())
        .or_else(|| authorization.and_then(|a| a.strip_prefix("Bearer ")));
    // Compared in full whatever the first difference, so the time taken tells nothing.
    given.is_some_and(|g| g.len() == want.len() && g.bytes().zip(want.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
}

/// `a=1&b=x%20y` → pairs, percent- and plus-decoded.
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_percent_and_plus() {
        assert_eq!(
            parse_query("exp=a%20b&filter=last(val.acc)+%3E+0.9&x"),
            [
                ("exp".into(), "a b".into()),
                ("filter".into(), "last(val.acc) > 0.9".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(decode("%2e%2e%2F"), "../");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}

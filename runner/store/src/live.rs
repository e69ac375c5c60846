//! Reading a store while a run owns it.
//!
//! sled lets one process open a database. The process that owns a store for a run (`xlab run`)
//! therefore serves reads to everyone else over a Unix socket in the store folder
//! (`xlab.sock`, mode 0600: only the store's owner may connect; no network port). A reader gets
//! a [`RemoteStore`], which implements [`ResultStore`] over that socket: every read command works
//! unchanged, sees finished jobs exactly as they will read after the run and running jobs with
//! their partial metric series, and never blocks the run (each connection has its own thread on
//! the owner's side, and sled serves reads beside the run's writer). Writes are refused: the run
//! is the store's one writer.
//!
//! The protocol moves raw records, not parsed ones: a request is one length-prefixed JSON
//! message, and the answer is the stored bytes of the records it names, which the reader parses
//! itself (on its own cores, as it would from its own sled). Batches ([`ResultStore::jobs_by_id`],
//! [`ResultStore::metrics_of_many`]) take one round trip each.
//!
//! Across machines (a coordinator running as a Slurm job, readers on the login node, the store
//! on a filesystem both see): a Unix socket cannot be reached from another machine, so an owner
//! started with `XLAB_SERVE_NETWORK=1` also listens on a TCP port and writes where, with a
//! random token, to `xlab.net` in the store folder (mode 0600: only those who may read the store
//! learn the token). A reader whose socket connection fails dials that address and presents the
//! token before its first request; a connection without it is closed unanswered.
//!
//! Faults: a garbled or oversized request gets an error answer and the connection is closed; a
//! panic while serving one is caught; a client that vanishes mid-request only ends its own
//! thread. A socket file left by a dead owner is removed by the next owner (the store's lock,
//! held by a live owner only, tells the two apart).

use crate::{
    decode_chunk, metric_prefix, Decision, ExperimentRecord, JobRecord, Result, ResultStore, Series, Store, StoreError,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The socket's name inside the store folder.
pub const SOCKET: &str = "xlab.sock";

/// Bumped when requests or answers change shape.
const PROTOCOL: u32 = 1;

/// The largest request accepted (ids of a batch included).
const MAX_REQUEST: u32 = 64 << 20;

/// Marks an absent record in an answer.
const ABSENT: u32 = u32::MAX;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Experiment {
        name: String,
    },
    Experiments,
    Jobs,
    JobsById {
        ids: Vec<String>,
    },
    IdsWithPrefix {
        prefix: String,
        at_most: usize,
    },
    MetricSeries {
        job: String,
        name: String,
    },
    MetricsOfMany {
        ids: Vec<String>,
    },
    Decisions {
        experiment: String,
        stage: String,
    },
    PutDecision {
        session: u64,
        record: Box<Decision>,
    },
    /// Another run joins the owner's: the connection this arrives on stays open for as long as
    /// that run goes on, and its closing is how the owner learns that the run ended.
    Join {
        experiment: String,
        pid: u32,
    },
    PutExperiment {
        session: u64,
        record: Box<ExperimentRecord>,
    },
    PutJob {
        session: u64,
        record: Box<JobRecord>,
    },
    /// Points as (step, [(name, f64 bits)]): JSON has no NaN or infinity.
    PutMetrics {
        session: u64,
        job: String,
        points: Vec<(u64, Vec<(String, u64)>)>,
    },
    Flush {
        session: u64,
    },
    /// A call of a joined run to the owner's scheduler (its pool, claims on jobs, stop requests).
    Call {
        session: u64,
        call: serde_json::Value,
    },
}

/// What the owner of a store offers the runs that join it, besides reads and writes: its device
/// pool, claims on jobs, its stop requests (implemented by the scheduler).
pub trait Host: Sync {
    /// A run of `experiment` by process `pid` joins: its session, or why it may not.
    fn join(&self, experiment: &str, pid: u32) -> std::result::Result<u64, String>;
    /// A call of a joined run.
    fn call(&self, session: u64, call: serde_json::Value) -> std::result::Result<serde_json::Value, String>;
    /// The run of `session` ended or went away: whatever it held is released.
    fn left(&self, session: u64);
    /// Whether `session` is a run joined now.
    fn is_member(&self, session: u64) -> bool;
}

/// Calls [`Host::left`] when a joined run's connection ends, however it ends.
struct Lifeline<'a> {
    host: Option<&'a dyn Host>,
    session: Option<u64>,
}

impl Drop for Lifeline<'_> {
    fn drop(&mut self) {
        if let (Some(h), Some(s)) = (self.host, self.session) {
            h.left(s);
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    protocol: u32,
    #[serde(flatten)]
    op: Op,
}

/// The socket of the store in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Where an owner that serves other machines listens: `xlab.net` in the store folder.
pub const NETWORK: &str = "xlab.net";

/// The network address of an owner that serves other machines, and the token it asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NetworkEndpoint {
    host: String,
    port: u16,
    token: String,
    pid: u32,
}

/// A connection to the owner: its Unix socket, or TCP from another machine.
enum Conn {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(c) => c.set_read_timeout(t),
            Conn::Tcp(c) => c.set_read_timeout(t),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(c) => (&*c).read(buf),
            Conn::Tcp(c) => (&*c).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(c) => (&*c).write(buf),
            Conn::Tcp(c) => (&*c).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(c) => (&*c).flush(),
            Conn::Tcp(c) => (&*c).flush(),
        }
    }
}

/// 128 random bits, as hex.
fn token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// This machine's name, as other machines of a cluster reach it.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into a buffer this function owns.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

/// Listens on a TCP port of every interface and writes `xlab.net` (address and token, mode
/// 0600) into the store folder.
fn listen_on_network(dir: &Path) -> std::io::Result<(std::net::TcpListener, NetworkEndpoint)> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0))?;
    let endpoint = NetworkEndpoint {
        host: hostname(),
        port: listener.local_addr()?.port(),
        token: token()?,
        pid: std::process::id(),
    };
    let path = dir.join(NETWORK);
    let tmp = dir.join(format!("{NETWORK}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(&endpoint).expect("an endpoint serializes"))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok((listener, endpoint))
}

/// Whether an owner on another machine is to be served too (`XLAB_SERVE_NETWORK=1`).
fn serves_network() -> bool {
    std::env::var("XLAB_SERVE_NETWORK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Reads the token a network reader sends first; whether it is the one asked for.
fn admitted(conn: &std::net::TcpStream, token: &str) -> bool {
    let mut r = conn;
    if conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).is_err() {
        return false;
    }
    let mut len = [0u8; 4];
    if r.read_exact(&mut len).is_err() || u32::from_le_bytes(len) as usize != token.len() {
        return false;
    }
    let mut got = vec![0u8; token.len()];
    if r.read_exact(&mut got).is_err() {
        return false;
    }
    // Every byte compared, whatever the first difference.
    got.iter().zip(token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Dials an owner on another machine as its `xlab.net` says, and presents the token.
fn dial_network(dir: &Path) -> std::io::Result<Conn> {
    let text = std::fs::read(dir.join(NETWORK))?;
    let e: NetworkEndpoint = serde_json::from_slice(&text)
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{NETWORK}: {err}")))?;
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(e.host.as_str(), e.port))?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} resolves to no address", e.host));
    for addr in addrs {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)) {
            Ok(c) => {
                let _ = c.set_nodelay(true);
                let mut w = &c;
                w.write_all(&(e.token.len() as u32).to_le_bytes())?;
                w.write_all(e.token.as_bytes())?;
                return Ok(Conn::Tcp(c));
            }
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// A connection to the owner of the store in `dir`: its socket, else its network address.
fn dial(dir: &Path) -> std::io::Result<Conn> {
    match UnixStream::connect(socket_path(dir)) {
        Ok(c) => Ok(Conn::Unix(c)),
        Err(e) if dir.join(NETWORK).exists() => dial_network(dir).map_err(|n| {
            std::io::Error::new(n.kind(), format!("{e} (its socket); {n} (its network address, {NETWORK})"))
        }),
        Err(e) => Err(e),
    }
}

/// Serves reads of `store` on its socket until `stop` is set (then wakes the listener with a
/// connection of its own and returns). A socket file a dead owner left behind is replaced.
/// Errors only if the socket cannot be made; serving faults never end the loop.
pub fn serve(store: &Store, stop: &AtomicBool, host: Option<&dyn Host>, ready: impl FnOnce()) -> std::io::Result<()> {
    serve_on(store, stop, host, serves_network(), ready)
}

/// [`serve`], on the network too when `network` is set.
fn serve_on(
    store: &Store,
    stop: &AtomicBool,
    host: Option<&dyn Host>,
    network: bool,
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    let path = socket_path(&store.dir);
    let net = store.dir.join(NETWORK);
    // We hold the store's lock, so no live owner serves on these.
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&net);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let network = if network { Some(listen_on_network(&store.dir)?) } else { None };
    ready();
    let cleanup = || {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&net);
    };
    // A run with nothing to do may end before the socket exists: its wake-up connection then
    // found nothing to wake, and the flag is all there is.
    if stop.load(Ordering::Acquire) {
        cleanup();
        return Ok(());
    }
    let serve_conn = |conn: Conn| {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_one(store, conn, stop, host)));
        if served.is_err() {
            tracing::warn!("a read of the store by another command failed inside xlab; the run goes on");
        }
    };
    std::thread::scope(|scope| {
        if let Some((tcp, endpoint)) = &network {
            tracing::info!("serving the store to other machines on {}:{} ({NETWORK})", endpoint.host, endpoint.port);
            scope.spawn(move || {
                for conn in tcp.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    scope.spawn(move || {
                        if admitted(&conn, &endpoint.token) {
                            let _ = conn.set_nodelay(true);
                            serve_conn(Conn::Tcp(conn));
                        }
                    });
                }
            });
        }
        for conn in listener.incoming() {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let Ok(conn) = conn else { continue };
            scope.spawn(move || serve_conn(Conn::Unix(conn)));
        }
        if let Some((tcp, _)) = &network {
            // Wakes the network listener, which then sees the flag.
            if let Ok(addr) = tcp.local_addr() {
                let _ = std::net::TcpStream::connect(("127.0.0.1", addr.port()));
            }
        }
    });
    cleanup();
    Ok(())
}

/// Ends [`serve`]: sets `stop` and wakes its listener.
pub fn stop_serving(dir: &Path, stop: &AtomicBool) {
    stop.store(true, Ordering::Release);
    let _ = UnixStream::connect(socket_path(dir));
}

/// How often an idle connection looks whether the run is ending (so a reader that keeps its
/// connection open never holds the run's exit up).
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

fn serve_one(store: &Store, conn: Conn, stop: &AtomicBool, host: Option<&dyn Host>) {
    let mut reader = BufReader::new(&conn);
    let mut writer = BufWriter::new(&conn);
    let mut lifeline = Lifeline { host, session: None };
    loop {
        // Between requests: wait for the next one, or for the run to end.
        let mut len = [0u8; 4];
        if conn.set_read_timeout(Some(IDLE_CHECK)).is_err() {
            return;
        }
        loop {
            match reader.read(&mut len[..1]) {
                Ok(0) => return, // the client is done
                Ok(_) => break,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    // A joined run's connection stays until that run ends: the owner waits for
                    // it before it stops serving.
                    if stop.load(Ordering::Acquire) && lifeline.session.is_none() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        // Within a request, no timeout: the client is sending it.
        if conn.set_read_timeout(None).is_err() || reader.read_exact(&mut len[1..]).is_err() {
            return;
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_REQUEST {
            let _ = answer_error(&mut writer, &format!("a request of {len} bytes is over the limit"));
            return;
        }
        let mut body = vec![0u8; len as usize];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let _ = answer_error(&mut writer, &format!("not a store request: {e}"));
                return;
            }
        };
        if request.protocol != PROTOCOL {
            let _ = answer_error(
                &mut writer,
                &format!(
                    "this store is served by another xlab version (protocol {PROTOCOL}, the reader speaks {})",
                    request.protocol
                ),
            );
            return;
        }
        let result = match (request.op, host) {
            (Op::Join { experiment, pid }, Some(h)) if lifeline.session.is_none() => match h.join(&experiment, pid) {
                Ok(session) => {
                    lifeline.session = Some(session);
                    write_items(&mut writer, &vec![Some(session.to_le_bytes().to_vec())])
                }
                Err(e) => answer_error(&mut writer, &e),
            },
            (Op::Join { .. }, _) => answer_error(
                &mut writer,
                "this store's owner takes no other runs (it is not running experiments, or this connection joined already)",
            ),
            (op, _) if op.session().is_some() => match (host, op.session()) {
                (Some(h), Some(session)) if h.is_member(session) => match write_or_call(store, h, session, op) {
                    Ok(items) => write_items(&mut writer, &items),
                    Err(e) => answer_error(&mut writer, &e),
                },
                _ => answer_error(&mut writer, "not a run joined to this store's owner: writes are refused"),
            },
            (op, _) => match answer(store, &op) {
                Ok(items) => write_items(&mut writer, &items),
                Err(e) => answer_error(&mut writer, &e.to_string()),
            },
        };
        if result.and_then(|()| writer.flush()).is_err() {
            return;
        }
    }
}

/// One answer's items: the stored bytes (None: absent).
type Items = Vec<Option<Vec<u8>>>;

impl Op {
    /// The session of a joined run's write or call.
    fn session(&self) -> Option<u64> {
        match self {
            Op::PutExperiment { session, .. }
            | Op::PutDecision { session, .. }
            | Op::PutJob { session, .. }
            | Op::PutMetrics { session, .. }
            | Op::Flush { session }
            | Op::Call { session, .. } => Some(*session),
            _ => None,
        }
    }
}

/// A joined run's write (done here, by the store's one writer process) or call to the owner.
fn write_or_call(store: &Store, host: &dyn Host, session: u64, op: Op) -> std::result::Result<Items, String> {
    let written = match op {
        Op::PutExperiment { record, .. } => store.put_experiment(&record),
        Op::PutJob { record, .. } => store.put_job(&record),
        Op::PutDecision { record, .. } => store.put_decision(&record),
        Op::PutMetrics { job, points, .. } => {
            let points: Vec<(u64, BTreeMap<String, f64>)> = points
                .into_iter()
                .map(|(step, values)| (step, values.into_iter().map(|(k, b)| (k, f64::from_bits(b))).collect()))
                .collect();
            store.put_metrics_batch(&job, &points)
        }
        Op::Flush { .. } => store.flush(),
        Op::Call { call, .. } => {
            let answer = host.call(session, call)?;
            return Ok(vec![Some(serde_json::to_vec(&answer).expect("JSON values serialize"))]);
        }
        _ => unreachable!("only writes and calls carry a session"),
    };
    written.map(|()| Vec::new()).map_err(|e| e.to_string())
}

fn answer(store: &Store, op: &Op) -> Result<Items> {
    let db = |e| store.db_err(e);
    let get = |tree: &sled::Tree, key: &[u8]| -> Result<Option<Vec<u8>>> {
        Ok(tree.get(key).map_err(db)?.map(|v| v.to_vec()))
    };
    let values = |tree: &sled::Tree| -> Result<Items> {
        tree.iter().map(|kv| kv.map(|(_, v)| Some(v.to_vec())).map_err(db)).collect()
    };
    // Every series of `job`: name, then its chunks' points in step order, as items in pairs.
    let series_of = |job: &str, out: &mut Items| -> Result<()> {
        let prefix = metric_prefix(job);
        let mut current: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut pairs: Items = Vec::new();
        for kv in store.metrics.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(db)?;
            let rest = &k[prefix.len()..];
            let end =
                rest.iter().position(|&b| b == 0).ok_or_else(|| store.corrupt("metric key without a chunk".into()))?;
            let name = &rest[..end];
            match &mut current {
                Some((n, points)) if n.as_slice() == name => points.extend_from_slice(&v),
                _ => {
                    if let Some((n, points)) = current.take() {
                        pairs.extend([Some(n), Some(points)]);
                    }
                    current = Some((name.to_vec(), v.to_vec()));
                }
            }
        }
        if let Some((n, points)) = current {
            pairs.extend([Some(n), Some(points)]);
        }
        out.push(Some((pairs.len() as u32 / 2).to_le_bytes().to_vec()));
        out.extend(pairs);
        Ok(())
    };
    match op {
        Op::Experiment { name } => Ok(vec![get(&store.experiments, name.as_bytes())?]),
        Op::Experiments => values(&store.experiments),
        Op::Jobs => values(&store.jobs),
        Op::JobsById { ids } => ids.iter().map(|id| get(&store.jobs, id.as_bytes())).collect(),
        Op::IdsWithPrefix { prefix, at_most } => store
            .jobs
            .scan_prefix(prefix.as_bytes())
            .take(*at_most)
            .map(|kv| kv.map(|(k, _)| Some(k.to_vec())).map_err(db))
            .collect(),
        Op::MetricSeries { job, name } => {
            let mut prefix = metric_prefix(job);
            prefix.extend_from_slice(name.as_bytes());
            prefix.push(0);
            let mut points = Vec::new();
            for kv in store.metrics.scan_prefix(&prefix) {
                points.extend_from_slice(&kv.map_err(db)?.1);
            }
            Ok(vec![Some(points)])
        }
        Op::MetricsOfMany { ids } => {
            let mut out = Vec::new();
            for id in ids {
                series_of(id, &mut out)?;
            }
            Ok(out)
        }
        Op::Decisions { experiment, stage } => store
            .decisions
            .scan_prefix(crate::decision_key(experiment, stage, None))
            .values()
            .map(|v| v.map(|v| Some(v.to_vec())).map_err(db))
            .collect(),
        Op::Join { .. }
        | Op::PutDecision { .. }
        | Op::PutExperiment { .. }
        | Op::PutJob { .. }
        | Op::PutMetrics { .. }
        | Op::Flush { .. }
        | Op::Call { .. } => unreachable!("joins, writes and calls are answered before reads"),
    }
}

fn write_items(w: &mut impl Write, items: &Items) -> std::io::Result<()> {
    w.write_all(&[0])?;
    w.write_all(&(items.len() as u32).to_le_bytes())?;
    for item in items {
        match item {
            None => w.write_all(&ABSENT.to_le_bytes())?,
            Some(bytes) => {
                w.write_all(&(bytes.len() as u32).to_le_bytes())?;
                w.write_all(bytes)?;
            }
        }
    }
    Ok(())
}

fn answer_error(w: &mut impl Write, message: &str) -> std::io::Result<()> {
    w.write_all(&[1])?;
    w.write_all(&(message.len() as u32).to_le_bytes())?;
    w.write_all(message.as_bytes())?;
    w.flush()
}

/// A store another process owns, read through its socket. Writes are refused.
pub struct RemoteStore {
    dir: PathBuf,
    /// The owner, for messages: its pid and command line.
    owner: (u32, String),
    /// Idle connections, reused by the next request.
    idle: Mutex<Vec<Conn>>,
    /// The store itself, opened here once its owner's run ended while this reader was
    /// reading: every later read goes to it.
    taken_over: std::sync::OnceLock<Store>,
    /// The session of a run joined to the owner's (see [`RemoteStore::join`]): its writes and
    /// calls carry it.
    session: std::sync::OnceLock<u64>,
    /// Set when the owner goes away while this run is joined to it.
    owner_gone: std::sync::Arc<AtomicBool>,
}

impl RemoteStore {
    /// Connects to the owner of the store in `dir` (pid and command for messages).
    pub fn connect(dir: &Path, owner: (u32, String)) -> std::io::Result<RemoteStore> {
        let first = dial(dir)?;
        Ok(RemoteStore {
            dir: dir.to_path_buf(),
            owner,
            idle: Mutex::new(vec![first]),
            taken_over: std::sync::OnceLock::new(),
            session: std::sync::OnceLock::new(),
            owner_gone: Default::default(),
        })
    }

    /// Joins the owner's run with a run of `experiment`: from now on this store writes through
    /// the owner (the store's one writer), and [`RemoteStore::call`] reaches its scheduler. A
    /// connection of its own stays open until this `RemoteStore` is dropped; the owner learns
    /// that this run ended (or was killed) when it closes, and this side learns that the owner
    /// went away when the owner closes it ([`RemoteStore::owner_gone`]).
    pub fn join(&self, experiment: &str, pid: u32) -> Result<u64> {
        let conn = dial(&self.dir).map_err(|e| self.lost(e))?;
        let op = Op::Join { experiment: experiment.into(), pid };
        let items = match exchange(&conn, op).map_err(|e| self.lost(e))? {
            Ok(items) => items,
            Err(message) => return Err(StoreError::Corrupt { dir: self.dir.clone(), message }),
        };
        let bytes = items.into_iter().next().flatten().unwrap_or_default();
        let session =
            u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| self.lost("a short answer to joining"))?);
        let _ = self.session.set(session);
        let gone = std::sync::Arc::clone(&self.owner_gone);
        std::thread::spawn(move || {
            // The owner never writes here again: any end of this read is the owner going away.
            let mut byte = [0u8; 1];
            loop {
                match (&conn).read(&mut byte) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    _ => break,
                }
            }
            gone.store(true, Ordering::Release);
        });
        Ok(session)
    }

    /// Whether the owner this run joined went away (killed, or its machine went down).
    pub fn owner_gone(&self) -> bool {
        self.owner_gone.load(Ordering::Acquire)
    }

    /// A call of a joined run to the owner's scheduler.
    pub fn call(&self, call: serde_json::Value) -> Result<serde_json::Value> {
        let session = self.joined("call the owner's scheduler")?;
        let items = self.write_op(Op::Call { session, call })?;
        let bytes = items.into_iter().next().flatten().unwrap_or_default();
        serde_json::from_slice(&bytes).map_err(|e| self.lost(format!("a garbled answer: {e}")))
    }

    fn joined(&self, what: &str) -> Result<u64> {
        match self.session.get() {
            Some(s) => Ok(*s),
            None => self.refuse(what),
        }
    }

    /// A write or call of a joined run: through the owner, or an error (never the store itself).
    fn write_op(&self, op: Op) -> Result<Items> {
        match self.call_raw(op) {
            Ok(items) => Ok(items),
            Err(Lost::Owner(e) | Lost::Answer(e)) => Err(e),
        }
    }

    /// The process that owns the store.
    pub fn owner(&self) -> (u32, &str) {
        (self.owner.0, &self.owner.1)
    }

    fn lost(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            message: format!(
                "lost the connection to pid {} ({}), which owns this store: {e}\n  hint: if that run ended, run the \
                 command again",
                self.owner.0, self.owner.1
            ),
        }
    }

    /// After the owner's run ended mid-read, the store opened here (waiting a moment for the
    /// owner to let go of it).
    fn take_over(&self) -> Result<&Store> {
        if let Some(s) = self.taken_over.get() {
            return Ok(s);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match Store::open(&self.dir) {
                Ok(s) => break s,
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        Ok(self.taken_over.get_or_init(|| store))
    }

    /// Runs a read: through the owner while it serves, on the store itself once it has gone.
    fn read<T>(&self, op: Op, local: impl Fn(&Store) -> Result<T>, remote: impl Fn(Items) -> Result<T>) -> Result<T> {
        if let Some(s) = self.taken_over.get() {
            return local(s);
        }
        match self.call_raw(op) {
            Ok(items) => remote(items),
            // A joined run never opens the store itself: it writes through the owner only.
            Err(Lost::Owner(e)) if self.session.get().is_some() => Err(e),
            Err(Lost::Owner(e)) => match self.take_over() {
                Ok(s) => local(s),
                Err(StoreError::InUse { .. }) => Err(e),
                Err(other) => Err(other),
            },
            Err(Lost::Answer(e)) => Err(e),
        }
    }

    fn call_raw(&self, op: Op) -> std::result::Result<Items, Lost> {
        let conn = self.idle.lock().expect("not poisoned").pop();
        let lost = |e: std::io::Error| Lost::Owner(self.lost(e));
        let conn = match conn {
            Some(c) => c,
            None => dial(&self.dir).map_err(lost)?,
        };
        match exchange(&conn, op).map_err(lost)? {
            Ok(items) => {
                self.idle.lock().expect("not poisoned").push(conn);
                Ok(items)
            }
            Err(message) => Err(Lost::Answer(StoreError::Corrupt { dir: self.dir.clone(), message })),
        }
    }

    fn refuse<T>(&self, what: &str) -> Result<T> {
        Err(StoreError::Corrupt {
            dir: self.dir.clone(),
            message: format!(
                "cannot {what}: pid {} ({}) owns this store and is its only writer while it runs\n  hint: wait for it to \
                 finish, or use another store with --store DIR",
                self.owner.0, self.owner.1
            ),
        })
    }

    fn record<T: serde::de::DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            dir: self.dir.clone(),
            message: format!("a record read from the run: {e}"),
        })
    }
}

/// Why a request got no items: the owner went away (its run ended, or it was killed), or it
/// answered with an error.
enum Lost {
    Owner(StoreError),
    Answer(StoreError),
}

/// Sends one request on `conn` and reads its answer.
fn exchange(conn: &Conn, op: Op) -> std::io::Result<std::result::Result<Items, String>> {
    let body = serde_json::to_vec(&Request { protocol: PROTOCOL, op }).expect("requests serialize");
    let mut w = BufWriter::new(conn);
    w.write_all(&(body.len() as u32).to_le_bytes()).and_then(|()| w.write_all(&body)).and_then(|()| w.flush())?;
    drop(w);
    let mut r = BufReader::with_capacity(1 << 16, conn);
    read_answer(&mut r)
}

/// An answer: its items, or the owner's error message.
fn read_answer(r: &mut impl Read) -> std::io::Result<std::result::Result<Items, String>> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag)?;
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n);
    if tag[0] == 1 {
        let mut msg = vec![0u8; n as usize];
        r.read_exact(&mut msg)?;
        return Ok(Err(String::from_utf8_lossy(&msg).into_owned()));
    }
    let mut items = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len == ABSENT {
            items.push(None);
        } else {
            let mut bytes = vec![0u8; len as usize];
            r.read_exact(&mut bytes)?;
            items.push(Some(bytes));
        }
    }
    Ok(Ok(items))
}

impl ResultStore for RemoteStore {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn flush(&self) -> Result<()> {
        match self.session.get() {
            Some(&session) => self.write_op(Op::Flush { session }).map(drop),
            None => Ok(()),
        }
    }

    fn put_experiment(&self, e: &ExperimentRecord) -> Result<()> {
        let session = self.joined("write an experiment")?;
        self.write_op(Op::PutExperiment { session, record: Box::new(e.clone()) }).map(drop)
    }

    fn experiment(&self, name: &str) -> Result<Option<ExperimentRecord>> {
        self.read(
            Op::Experiment { name: name.into() },
            |s| s.experiment(name),
            |mut items| match items.pop().flatten() {
                Some(b) => self.record(&b).map(Some),
                None => Ok(None),
            },
        )
    }

    fn experiments(&self) -> Result<Vec<ExperimentRecord>> {
        self.read(
            Op::Experiments,
            |s| s.experiments(),
            |items| items.into_iter().flatten().map(|b| self.record(&b)).collect(),
        )
    }

    fn put_job(&self, j: &JobRecord) -> Result<()> {
        let session = self.joined("write a job")?;
        self.write_op(Op::PutJob { session, record: Box::new(j.clone()) }).map(drop)
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        Ok(self.jobs_by_id(&[id])?.pop().flatten())
    }

    fn put_decision(&self, d: &Decision) -> Result<()> {
        let session = self.joined("write a search decision")?;
        self.write_op(Op::PutDecision { session, record: Box::new(d.clone()) }).map(drop)
    }

    fn decisions(&self, experiment: &str, stage: &str) -> Result<Vec<Decision>> {
        self.read(
            Op::Decisions { experiment: experiment.into(), stage: stage.into() },
            |s| s.decisions(experiment, stage),
            |items| items.into_iter().flatten().map(|b| self.record(&b)).collect(),
        )
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        self.read(Op::Jobs, |s| s.jobs(), |items| items.into_iter().flatten().map(|b| self.record(&b)).collect())
    }

    fn jobs_by_id(&self, ids: &[&str]) -> Result<Vec<Option<JobRecord>>> {
        self.read(
            Op::JobsById { ids: ids.iter().map(|s| s.to_string()).collect() },
            |s| s.jobs_by_id(ids),
            |items| items.into_iter().map(|i| i.map(|b| self.record(&b)).transpose()).collect(),
        )
    }

    fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> Result<Vec<String>> {
        self.read(
            Op::IdsWithPrefix { prefix: prefix.into(), at_most },
            |s| s.job_ids_with_prefix(prefix, at_most),
            |items| Ok(items.into_iter().flatten().map(|k| String::from_utf8_lossy(&k).into_owned()).collect()),
        )
    }

    fn put_metrics_batch(&self, job: &str, points: &[(u64, BTreeMap<String, f64>)]) -> Result<()> {
        let session = self.joined("write metrics")?;
        let points = points
            .iter()
            .map(|(step, values)| (*step, values.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect()))
            .collect();
        self.write_op(Op::PutMetrics { session, job: job.into(), points }).map(drop)
    }

    fn metric_series(&self, job: &str, name: &str) -> Result<Vec<(u64, f64)>> {
        self.read(
            Op::MetricSeries { job: job.into(), name: name.into() },
            |s| s.metric_series(job, name),
            |mut items| Ok(decode_chunk(&self.dir, &items.pop().flatten().unwrap_or_default())?.into_iter().collect()),
        )
    }

    fn metrics_of(&self, job: &str) -> Result<Series> {
        Ok(self.metrics_of_many(&[job])?.pop().unwrap_or_default())
    }

    fn metrics_of_many(&self, ids: &[&str]) -> Result<Vec<Series>> {
        self.read(
            Op::MetricsOfMany { ids: ids.iter().map(|s| s.to_string()).collect() },
            |s| s.metrics_of_many(ids),
            |items| self.series_of_answer(ids.len(), items),
        )
    }
}

impl RemoteStore {
    /// The series of `n` jobs from a `MetricsOfMany` answer: per job a count, then the name and
    /// points of each series.
    fn series_of_answer(&self, n: usize, items: Items) -> Result<Vec<Series>> {
        let mut it = items.into_iter();
        let bad = || StoreError::Corrupt { dir: self.dir.clone(), message: "a short answer from the run".into() };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let count = it.next().flatten().ok_or_else(bad)?;
            let count = u32::from_le_bytes(count.as_slice().try_into().map_err(|_| bad())?);
            let mut series = BTreeMap::new();
            for _ in 0..count {
                let name = it.next().flatten().ok_or_else(bad)?;
                let points = it.next().flatten().ok_or_else(bad)?;
                series.insert(
                    String::from_utf8_lossy(&name).into_owned(),
                    decode_chunk(&self.dir, &points)?.into_iter().collect(),
                );
            }
            out.push(series);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run ended (and asked its server to stop) before the server made its socket: serving
    /// returns at once instead of waiting for a connection that never comes.
    #[test]
    fn a_server_asked_to_stop_before_it_starts_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stop = AtomicBool::new(false);
        stop_serving(dir.path(), &stop);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                serve(&store, &stop, None, || {}).unwrap();
                tx.send(()).unwrap();
            });
            let returned = rx.recv_timeout(std::time::Duration::from_secs(5));
            if returned.is_err() {
                // Unblock the server so the test can end, then fail.
                let _ = UnixStream::connect(socket_path(dir.path()));
                panic!("serve waited for a connection although asked to stop");
            }
        });
        assert!(!socket_path(dir.path()).exists());
    }

    /// Job `j1` of a test store, in `status`.
    fn job_j1(status: &str) -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "id": "j1", "experiment": "e", "stage": "s", "seed": 0, "config": {}, "point": [], "parents": [],
            "status": status, "attempts": [], "summary": {}, "provenance": {"xlab_version": "t"}, "artifacts": []
        }))
        .unwrap()
    }

    /// A store read through a serving owner answers as the store itself does.
    #[test]
    fn a_remote_read_matches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let job = job_j1("running");
        store.put_job(&job).unwrap();
        let points: Vec<(u64, BTreeMap<String, f64>)> = (1..=200)
            .map(|s| (s, BTreeMap::from([("a".to_string(), s as f64), ("b".to_string(), -(s as f64))])))
            .collect();
        store.put_metrics_batch("j1", &points).unwrap();
        let stop = AtomicBool::new(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| serve(&store, &stop, None, || ready_tx.send(()).unwrap()).unwrap());
            ready_rx.recv().unwrap();
            let remote = RemoteStore::connect(dir.path(), (1, "test".into())).unwrap();
            assert_eq!(remote.job("j1").unwrap(), store.job("j1").unwrap());
            assert_eq!(remote.job("nope").unwrap(), None);
            assert_eq!(remote.metrics_of("j1").unwrap(), store.metrics_of("j1").unwrap());
            assert_eq!(remote.metric_series("j1", "b").unwrap(), store.metric_series("j1", "b").unwrap());
            assert_eq!(remote.job_ids_with_prefix("j", 10).unwrap(), vec!["j1".to_string()]);
            assert!(remote.put_job(&job).is_err(), "writes are the owner's");
            stop_serving(dir.path(), &stop);
        });
    }

    /// An owner on another machine: its socket cannot be reached (here, it is gone), so a reader
    /// dials the address in `xlab.net` with its token; a connection without the token gets
    /// nothing. The files are removed when serving ends.
    #[test]
    fn a_reader_on_another_machine_reads_over_the_network_with_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let job = job_j1("done");
        store.put_job(&job).unwrap();
        let stop = AtomicBool::new(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| serve_on(&store, &stop, None, true, || ready_tx.send(()).unwrap()).unwrap());
            ready_rx.recv().unwrap();
            let net = dir.path().join(NETWORK);
            let mode = std::fs::metadata(&net).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "only the store's owner may read the token");
            let away = dir.path().join("elsewhere.sock");
            std::fs::rename(socket_path(dir.path()), &away).unwrap();
            let remote = RemoteStore::connect(dir.path(), (1, "test".into())).unwrap();
            assert!(matches!(remote.idle.lock().unwrap()[0], Conn::Tcp(_)));
            assert_eq!(remote.job("j1").unwrap(), store.job("j1").unwrap());
            assert_eq!(remote.jobs().unwrap().len(), 1);
            // The same request without the token: the connection is closed unanswered.
            let e: NetworkEndpoint = serde_json::from_slice(&std::fs::read(&net).unwrap()).unwrap();
            let stranger = Conn::Tcp(std::net::TcpStream::connect(("127.0.0.1", e.port)).unwrap());
            assert!(exchange(&stranger, Op::Jobs).is_err(), "no answer without the token");
            let mut wrong = e.clone();
            wrong.token = "0".repeat(e.token.len());
            std::fs::write(&net, serde_json::to_vec(&wrong).unwrap()).unwrap();
            let refused = dial(dir.path()).unwrap();
            assert!(exchange(&refused, Op::Jobs).is_err(), "no answer with another token");
            std::fs::rename(&away, socket_path(dir.path())).unwrap();
            stop_serving(dir.path(), &stop);
        });
        assert!(!dir.path().join(NETWORK).exists());
    }
}

//! The Slurm executor against a real single-node Slurm cluster (munged, slurmctld and slurmd
//! from Debian's packages, which `make setup` installs when it runs as root), started by each
//! test in its own folder on free ports and stopped after it. Where the cluster cannot start
//! (the packages are missing, or not root), each test says so and is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{attempts, cmd, job_ids, snapshot, weights};

/// A sweep with a job array (three seeds of one stage) and a single job (a SAM stage); every
/// job is deterministic, so the Slurm results must equal a local run's bit for bit.
const SWEEP: &str = r#"
name: on-slurm
executor: {slurm: {poll_s: 0.25, array_parallelism: 2}}
defaults:
  task: train
  data: {name: spurious, n_train: 8192, n_val: 0, n_test: 256}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  epochs: EPOCHS
  batch_size: 32
  deterministic: true
stages:
  erm:
    seeds: 3
    retries: 1
  sam:
    step_rule: {use: sam.sam, rho: 0.05}
    retries: 1
"#;

struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn tool(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(c: &mut Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{c:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A MariaDB server and slurmdbd for a cluster with accounting: the association limits that
/// `sacctmgr` sets (`modify user root set MaxSubmitJobs=6`), which Slurm enforces.
struct Accounting<'a> {
    /// `sacctmgr -i` commands run after the cluster, an account `xlab` and the user are added.
    limits: &'a [&'a str],
}

impl Cluster {
    /// A single-node cluster: munge authentication, cons_tres selection, no accounting; `extra`:
    /// more lines for its slurm.conf (limits).
    fn start(extra: &str) -> Result<Cluster, String> {
        Cluster::start_with(extra, None)
    }

    /// With `accounting`, the cluster's jobs are accounted in slurmdbd (over a MariaDB server of
    /// its own) and their association's limits enforced.
    fn start_with(extra: &str, accounting: Option<Accounting<'_>>) -> Result<Cluster, String> {
        let mut needed = vec!["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo"];
        if accounting.is_some() {
            needed.extend(["slurmdbd", "sacctmgr", "mariadbd", "mariadb-install-db"]);
        }
        let missing: Vec<&str> = needed.into_iter().filter(|t| !tool(t)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} not installed (Debian: slurmctld slurmd slurm-client munge slurmdbd mariadb-server; `make \
                 slurm-packages` installs them as root)",
                missing.join(", ")
            ));
        }
        if run(Command::new("id").arg("-u"))?.trim() != "0" {
            return Err("slurmd must run as root to start jobs, and this test is not root".into());
        }
        let dir = tempfile::Builder::new().prefix("xlab-slurm-").tempdir_in("/tmp").map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let mut key = vec![0u8; 1024];
        {
            use std::io::Read;
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).map_err(|e| e.to_string())?;
        }
        std::fs::write(d.join("munge.key"), key).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("munge.key"), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        let socket = d.join("munge.sock");
        run(Command::new("munged")
            .arg("--force")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", d.join("munge.key").display()))
            .arg(format!("--log-file={}", d.join("log/munged.log").display()))
            .arg(format!("--pid-file={}", d.join("munged.pid").display()))
            .arg(format!("--seed-file={}", d.join("munged.seed").display())))?;
        let host = run(Command::new("hostname").arg("-s"))?.trim().to_string();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let p = |s: &str| d.join(s).display().to_string();
        // `extra`'s partitions replace the default one; its other lines are global settings.
        let (parts, others): (Vec<&str>, Vec<&str>) = extra.lines().partition(|l| l.starts_with("PartitionName="));
        let mut globals: String = others.iter().map(|l| format!("{l}\n")).collect();
        let storage = match &accounting {
            None => "accounting_storage/none",
            Some(_) => {
                let dbd = free_port();
                start_accounting_database(d, &host, &socket, dbd)?;
                globals += &format!(
                    "AccountingStorageHost=127.0.0.1\nAccountingStoragePort={dbd}\nAccountingStoragePass={}\n\
                     AccountingStorageEnforce=associations,limits\n",
                    socket.display()
                );
                "accounting_storage/slurmdbd"
            }
        };
        let partitions: String = if parts.is_empty() {
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n".into()
        } else {
            parts.iter().map(|l| format!("{l}\n")).collect()
        };
        let conf = format!(
            "ClusterName=xlabtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={}\nSlurmdPort={}\n\
             AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={}\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\nAccountingStorageType={storage}\n\
             MpiDefault=none\nSlurmUser=root\nSlurmdUser=root\nStateSaveLocation={}\nSlurmdSpoolDir={}\n\
             SlurmctldPidFile={}\nSlurmdPidFile={}\nSlurmctldLogFile={}\nSlurmdLogFile={}\n\
             ReturnToService=2\nKillWait=5\nMinJobAge=600\nSchedulerParameters=sched_interval=1\n{globals}\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n{partitions}",
            free_port(),
            free_port(),
            socket.display(),
            p("state"),
            p("spool"),
            p("slurmctld.pid"),
            p("slurmd.pid"),
            p("log/slurmctld.log"),
            p("log/slurmd.log"),
        );
        let conf_path = d.join("slurm.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let cluster = Cluster { dir, conf: conf_path };
        if let Some(a) = &accounting {
            run(&mut cluster.slurm("slurmdbd"))?;
            // slurmdbd answers once it has made its tables; then the cluster, an account, the
            // user and the limits go in, before slurmctld starts and reads them.
            let deadline = Instant::now() + Duration::from_secs(60);
            while run(cluster.slurm("sacctmgr").args(["-n", "show", "cluster"])).is_err() {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(cluster.dir.path().join("log/slurmdbd.log")).unwrap_or_default();
                    return Err(format!("slurmdbd did not answer within 60 s; its log:\n{log}"));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let account = ["add cluster xlabtest", "add account xlab", "add user root account=xlab"];
            for command in account.iter().chain(a.limits) {
                run(cluster.slurm("sacctmgr").arg("-i").args(command.split_whitespace()))?;
            }
        }
        run(Command::new("slurmctld").arg("-i").env("SLURM_CONF", &cluster.conf))?;
        run(Command::new("slurmd").env("SLURM_CONF", &cluster.conf))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = run(Command::new("sinfo").args(["-h", "-o", "%t"]).env("SLURM_CONF", &cluster.conf));
            if state.as_deref().is_ok_and(|s| s.trim() == "idle") {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                let logs = ["slurmctld.log", "slurmd.log"]
                    .iter()
                    .map(|l| std::fs::read_to_string(cluster.dir.path().join("log").join(l)).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(format!("the node did not come up within 30 s (sinfo: {state:?}); logs:\n{logs}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `xlab --store STORE` talking to this cluster.
    fn xlab(&self, store: &Path) -> Command {
        let mut c = cmd(store);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `xlab run FILE` in the background.
    fn run_in_background(&self, store: &Path, file: &Path) -> Coordinator {
        let mut c = self.xlab(store);
        c.arg("run").arg(file);
        Coordinator::start(c)
    }

    /// `xlab run FILE` in the background until a job has checkpointed after its first epoch,
    /// then Ctrl-C: the coordinator leaves (exit 130) and its jobs keep running in Slurm.
    /// Returns what it said.
    fn run_then_interrupt(&self, store: &Path, file: &Path) -> String {
        let child = self.run_in_background(store, file);
        job_past_epoch(store, 1, &[], Duration::from_secs(120));
        assert!(Command::new("kill").args(["-INT", &child.pid()]).status().unwrap().success());
        let out = child.wait();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(130), "{err}");
        err
    }

    fn slurm(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

/// A MariaDB server on its own folder and port (no grant tables: only this test reaches it), and
/// the configuration of a slurmdbd over it (port `dbd`), both in the cluster's folder `d`.
fn start_accounting_database(d: &Path, host: &str, munge: &Path, dbd: u16) -> Result<(), String> {
    let p = |s: &str| d.join(s).display().to_string();
    run(Command::new("mariadb-install-db").args([
        "--user=root",
        &format!("--datadir={}", p("db")),
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
    ]))?;
    let sql = free_port();
    Command::new("mariadbd")
        .args(["--user=root", &format!("--datadir={}", p("db")), &format!("--socket={}", p("mysql.sock"))])
        .args([&format!("--port={sql}"), "--bind-address=127.0.0.1", &format!("--pid-file={}", p("mysql.pid"))])
        .args(["--skip-grant-tables", &format!("--log-error={}", p("log/mysql.log"))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mariadbd: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(d.join("log/mysql.log")).unwrap_or_default().contains("ready for connections") {
        if Instant::now() > deadline {
            return Err(format!("MariaDB did not start within 60 s: {}", p("log/mysql.log")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let conf = format!(
        "AuthType=auth/munge\nAuthInfo=socket={}\nDbdHost={host}\nDbdAddr=127.0.0.1\nDbdPort={dbd}\nSlurmUser=root\n\
         StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={sql}\nStorageUser=root\n\
         StorageLoc=slurm_acct_db\nPidFile={}\nLogFile={}\n",
        munge.display(),
        p("slurmdbd.pid"),
        p("log/slurmdbd.log"),
    );
    // slurmdbd reads slurmdbd.conf beside slurm.conf, and only if no one else may read it.
    let path = d.join("slurmdbd.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.slurm("scancel").arg("--me").output();
        std::thread::sleep(Duration::from_millis(500));
        for pid in ["slurmd.pid", "slurmctld.pid", "slurmdbd.pid", "mysql.pid", "munged.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.path().join(pid)) {
                let _ = Command::new("kill").arg(p.trim()).status();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A coordinator started in the background, killed if the test ends early (a failed assertion).
struct Coordinator(Option<std::process::Child>);

impl Coordinator {
    fn start(mut c: Command) -> Self {
        Coordinator(Some(c.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap()))
    }

    fn pid(&self) -> String {
        self.0.as_ref().unwrap().id().to_string()
    }

    fn wait(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cluster_or_skip(test: &str) -> Option<Cluster> {
    cluster_with_or_skip(test, "")
}

fn cluster_with_or_skip(test: &str, extra: &str) -> Option<Cluster> {
    match Cluster::start(extra) {
        Ok(c) => Some(c),
        Err(why) => {
            common::skipped(test, &format!("no Slurm test cluster on this machine: {why}"));
            None
        }
    }
}

fn sweep(dir: &Path, epochs: u32) -> PathBuf {
    let f = dir.join("sweep.yaml");
    std::fs::write(&f, SWEEP.replace("EPOCHS", &epochs.to_string())).unwrap();
    f
}

/// The same sweep run here, for comparison.
fn local_reference(dir: &Path, file: &Path) -> PathBuf {
    let reference = dir.join("reference");
    let out = cmd(&reference).args(["run", "--executor", "local", "-j", "2"]).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    reference
}

/// A job whose first attempt has written a checkpoint after epoch `epoch` (not one of `but`).
fn job_past_epoch(store: &Path, epoch: u64, but: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        for run in std::fs::read_dir(store.join("runs")).into_iter().flatten().flatten() {
            let events = std::fs::read_to_string(run.path().join("events-1.jsonl")).unwrap_or_default();
            let reached = events
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|e| e["event"] == "checkpoint" && e["epoch"].as_u64().is_some_and(|n| n >= epoch));
            let id = run.file_name().to_string_lossy().into_owned();
            if reached && !but.contains(&id.as_str()) {
                return id;
            }
        }
        assert!(Instant::now() < deadline, "no job reached a checkpoint after epoch {epoch} in Slurm");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every metric series and the final weights of `jobs` in `store` equal those of the local run in
/// `reference`, bit for bit.
fn equal_to_local(store: &Path, reference: &Path, jobs: &[String], what: &str) {
    assert_eq!(snapshot(store, jobs), snapshot(reference, jobs), "{what}");
    assert_eq!(weights(store, jobs), weights(reference, jobs), "{what}: final weights");
}

fn record(store: &Path, id: &str) -> serde_json::Value {
    let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn slurm_ids(store: &Path, id: &str) -> Vec<String> {
    record(store, id)["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["slurm_job"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_sweep_runs_in_slurm_and_a_cancelled_job_resumes_from_its_checkpoint() {
    let Some(cluster) = cluster_or_skip("a_sweep_runs_in_slurm_and_a_cancelled_job_resumes_from_its_checkpoint") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = sweep(dir.path(), 40);
    let reference = local_reference(dir.path(), &file);

    let store = dir.path().join("results");
    let child = cluster.run_in_background(&store, &file);
    // Cancel a job in Slurm once it has checkpointed twice, as a user or an administrator would.
    let victim = job_past_epoch(&store, 2, &[], Duration::from_secs(120));
    // The store is the running coordinator's; its status file names each job's Slurm id.
    let slurm_id_of = |job: &str| {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.join("status.json")).unwrap()).unwrap();
        let running = status["running"].as_array().unwrap();
        running.iter().find(|r| r["job"] == job).unwrap()["slurm_job"].as_str().unwrap().to_string()
    };
    let slurm_id = slurm_id_of(&victim);
    run(cluster.slurm("scancel").arg(&slurm_id)).unwrap();
    // Another one gets only a SIGTERM, as `--signal=B:TERM@T` sends it T seconds before the
    // time limit: it stops at a checkpoint and ends its Slurm job itself.
    let signalled = job_past_epoch(&store, 2, &[&victim], Duration::from_secs(120));
    let signalled_id = slurm_id_of(&signalled);
    run(cluster.slurm("scancel").args(["--batch", "--signal=TERM"]).arg(&signalled_id)).unwrap();
    let out = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("Slurm job {slurm_id} was cancelled in Slurm")), "{err}");
    assert!(err.contains("from its checkpoint after epoch"), "the retry resumed: {err}");

    assert_eq!(attempts(&store, &victim), ["crashed", "done"], "{err}");
    assert_eq!(attempts(&store, &signalled), ["timeout", "done"], "{err}");
    assert!(err.contains(&format!("Slurm job {signalled_id} was signalled to stop before its time limit")), "{err}");
    assert_eq!(err.matches("from its checkpoint after epoch").count(), 2, "both retries resumed: {err}");
    let ids = slurm_ids(&store, &victim);
    assert!(ids[0] == slurm_id && !ids[1].is_empty() && ids[1] != slurm_id, "{ids:?}");
    // The three ready seeds went in as one job array, the SAM job alone.
    let jobs = job_ids(&store, &file);
    let firsts: Vec<String> = jobs.iter().map(|j| slurm_ids(&store, j)[0].clone()).collect();
    let array = firsts[0].split('_').next().unwrap().to_string();
    for (k, f) in firsts[..3].iter().enumerate() {
        assert_eq!(f, &format!("{array}_{k}"), "{firsts:?}");
    }
    assert!(!firsts[3].contains('_'), "{firsts:?}");
    // Every metric series is complete, once, and equal to the local run's; so are the weights.
    equal_to_local(&store, &reference, &jobs, "Slurm results equal local ones");
    let status = cluster.xlab(&store).arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("stage `erm`: 3 done"), "{status:?}");
    let doctor = cluster.xlab(&store).arg("doctor").output().unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(said.contains("Slurm:        slurm") && said.contains("job(s) of yours listed"), "{said}");
}

#[test]
fn a_restarted_coordinator_re_attaches_to_its_jobs_instead_of_submitting_them_again() {
    let Some(cluster) =
        cluster_or_skip("a_restarted_coordinator_re_attaches_to_its_jobs_instead_of_submitting_them_again")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = sweep(dir.path(), 30);
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");

    // Ctrl-C: the coordinator leaves; its jobs keep running in Slurm.
    let err = cluster.run_then_interrupt(&store, &file);
    assert!(err.contains("job(s) keep running in Slurm"), "{err}");
    let status = cluster.xlab(&store).arg("status").output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("in Slurm (run the same command again") && shown.contains("Slurm job "), "{shown}");

    // Their workers write checkpoints without the store's lock: gc leaves them alone.
    let gc = cluster.xlab(&store).arg("gc").output().unwrap();
    let said = String::from_utf8_lossy(&gc.stdout);
    assert!(gc.status.success() && said.contains("left 4 job(s) alone that may still run in Slurm"), "{said}");

    // Running them here as well would have two workers write one run folder.
    let local = cluster.xlab(&store).args(["run", "--executor", "local"]).arg(&file).output().unwrap();
    let lerr = String::from_utf8_lossy(&local.stderr);
    assert!(!local.status.success() && lerr.contains("is still in Slurm as job"), "{lerr}");

    // Restarted, killed hard mid-run, restarted again: the same Slurm jobs to the end.
    let child = cluster.run_in_background(&store, &file);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-KILL", &child.pid()]).status().unwrap().success());
    let _ = child.wait();
    let out = cluster.xlab(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(re-attached)"), "{err}");

    let jobs = job_ids(&store, &file);
    for j in &jobs {
        assert_eq!(attempts(&store, j), ["done"], "{j}: one Slurm job from start to end\n{err}");
    }
    let scripts = std::fs::read_dir(store.join("slurm"))
        .unwrap()
        .flatten()
        .filter(|f| f.path().extension().is_some_and(|e| e == "sh"))
        .count();
    assert_eq!(scripts, 2, "one array for the seeds and one job for SAM, never submitted again");
    equal_to_local(&store, &reference, &jobs, "every point ingested once, as a local run has it");
}

/// A stage DAG (one child per parent, and one child of all parents) runs in Slurm stage by stage,
/// from the command line's `--executor slurm` alone, and ends with a local run's results.
#[test]
fn a_stage_dag_runs_in_slurm_as_it_runs_here() {
    let Some(cluster) = cluster_or_skip("a_stage_dag_runs_in_slurm_as_it_runs_here") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/evaluate.yaml");
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");
    let out = cluster.xlab(&store).args(["run", "--executor", "slurm"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("on Slurm (1 CPU(s) a job; MaxArraySize "), "{err}");
    let jobs = job_ids(&store, &file);
    assert_eq!(jobs.len(), 9);
    for j in &jobs {
        assert_eq!(attempts(&store, j), ["done"], "{j}");
        assert!(!slurm_ids(&store, j)[0].is_empty(), "{j} ran in Slurm");
    }
    assert_eq!(snapshot(&store, &jobs), snapshot(&reference, &jobs));
}

/// This user's jobs Slurm has not finished, each array task counted.
fn queued(cluster: &Cluster) -> Vec<(String, String)> {
    let out =
        run(cluster.slurm("squeue").args(["--noheader", "--me", "--array", "--format=%i|%T"])).unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(id, state)| (id.trim().to_string(), state.trim().to_string()))
        .filter(|(_, state)| !matches!(state.as_str(), "COMPLETED" | "CANCELLED" | "FAILED" | "TIMEOUT"))
        .collect()
}

/// 20 jobs against a cluster whose arrays hold at most 4 tasks (`MaxArraySize=4`) and a user
/// who may queue at most 6 jobs: arrays are split, submission waits for room, and the results are
/// a local run's. `cap` is the file's `max_submit` (a site limit `sacctmgr` does not show), or
/// none where the cluster's accounting holds the limit; `from` is where the run says it found it.
fn a_sweep_beyond_limits(cluster: Cluster, cap: Option<u32>, from: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wide.yaml");
    std::fs::write(
        &file,
        r#"
name: wide
executor: {slurm: {poll_s: 0.25MAX_SUBMIT}}
defaults:
  task: train
  data: {name: spurious, n_train: 512, n_val: 0, n_test: 128}
  model: {name: mlp, hidden: [8]}
  optimizer: {name: sgd, lr: 0.05}
  epochs: 2
  batch_size: 32
  deterministic: true
stages:
  erm:
    seeds: 20
"#
        .replace("MAX_SUBMIT", &cap.map(|c| format!(", max_submit: {c}")).unwrap_or_default()),
    )
    .unwrap();
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");
    let child = cluster.run_in_background(&store, &file);
    // Watch the queue while the sweep runs: never more than 6 of the user's jobs in it.
    let (stop, most) = (
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let watcher = {
        let (stop, most, conf) = (stop.clone(), most.clone(), cluster.conf.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new("squeue")
                    .args(["--noheader", "--me", "--array", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING"])
                    .env("SLURM_CONF", &conf)
                    .output();
                if let Ok(o) = out {
                    let n = String::from_utf8_lossy(&o.stdout).lines().count();
                    most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = child.wait();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("MaxArraySize 4") && err.contains(&format!("at most 6 queued job(s) per user ({from})")),
        "{err}"
    );
    assert!(err.contains("held back: 6 of your jobs are in Slurm's queue"), "{err}");
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=6).contains(&most), "at most 6 jobs queued at once, saw {most}");
    // Every array fits MaxArraySize: task lists of at most 4 lines, at least 5 of them.
    let lists: Vec<usize> = std::fs::read_dir(store.join("slurm"))
        .unwrap()
        .flatten()
        .filter(|f| f.path().extension().is_some_and(|e| e == "tasks"))
        .map(|f| std::fs::read_to_string(f.path()).unwrap().lines().count())
        .collect();
    assert!(lists.len() >= 5 && lists.iter().all(|&n| (1..=4).contains(&n)), "{lists:?}");
    assert_eq!(lists.iter().sum::<usize>(), 20, "{lists:?}");
    let jobs = job_ids(&store, &file);
    assert_eq!(jobs.len(), 20);
    for j in &jobs {
        assert_eq!(attempts(&store, j), ["done"], "{j}");
    }
    equal_to_local(&store, &reference, &jobs, "Slurm results equal local ones");
    let doctor = cluster.xlab(&store).arg("doctor").output().unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(said.contains("Slurm limits: MaxArraySize 4"), "{said}");
    if cap.is_none() {
        assert!(said.contains("at most 6 queued job(s) per user (MaxSubmitJobs of your association)"), "{said}");
    } else {
        assert!(said.contains("MaxSubmitJobs not visible"), "{said}");
    }
    assert!(said.contains("store's disk:"), "{said}");
}

#[test]
fn a_sweep_beyond_the_clusters_limits_is_split_and_throttled_and_completes() {
    let test = "a_sweep_beyond_the_clusters_limits_is_split_and_throttled_and_completes";
    if let Some(cluster) = cluster_with_or_skip(test, "MaxArraySize=4\n") {
        a_sweep_beyond_limits(cluster, Some(6), "the file's `max_submit`");
    }
}

/// The same, the cap being `MaxSubmitJobs=6` of the user's association in the cluster's own
/// accounting (slurmdbd), which xlab reads with `sacctmgr` and Slurm enforces: a submission over
/// it would be refused.
#[test]
fn a_sweep_beyond_the_accounts_max_submit_jobs_is_throttled_and_completes() {
    let test = "a_sweep_beyond_the_accounts_max_submit_jobs_is_throttled_and_completes";
    let accounting = Accounting { limits: &["modify user root set MaxSubmitJobs=6"] };
    match Cluster::start_with("MaxArraySize=4\n", Some(accounting)) {
        Ok(cluster) => a_sweep_beyond_limits(cluster, None, "MaxSubmitJobs of your association"),
        Err(why) => common::skipped(test, &format!("no Slurm test cluster with accounting on this machine: {why}")),
    }
}

/// The coordinator is stopped (Ctrl-C), then every job of the sweep is cancelled in Slurm, the
/// running ones and the array tasks still pending. The next `xlab run` finishes the sweep in one
/// pass: the jobs that had run resume from their checkpoints, those that never started are
/// submitted again, and their cancellation is recorded as `not_started`, not as a failure.
#[test]
fn jobs_cancelled_before_they_started_are_submitted_again_by_the_next_run() {
    let Some(cluster) = cluster_or_skip("jobs_cancelled_before_they_started_are_submitted_again_by_the_next_run")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sweep.yaml");
    // One array task at a time: while seed 0 runs, seeds 1 and 2 wait in the queue.
    std::fs::write(&file, SWEEP.replace("EPOCHS", "30").replace("array_parallelism: 2", "array_parallelism: 1"))
        .unwrap();
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");

    cluster.run_then_interrupt(&store, &file);
    let pending: Vec<String> =
        queued(&cluster).into_iter().filter(|(_, state)| state == "PENDING").map(|(id, _)| id).collect();
    assert!(!pending.is_empty(), "array tasks wait their turn: {:?}", queued(&cluster));
    run(cluster.slurm("scancel").arg("--me")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !queued(&cluster).is_empty() {
        assert!(Instant::now() < deadline, "scancel emptied the queue: {:?}", queued(&cluster));
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = cluster.xlab(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "one rerun finishes the sweep: {err}");
    // Cancelled pending tasks of an array may leave `squeue` at once: "left Slurm's queue".
    assert!(
        err.contains(
            "before it started; submitting it again (it never ran, so this does not count against `retries:`)"
        ),
        "{err}"
    );
    let jobs = job_ids(&store, &file);
    let mut never = 0;
    for j in &jobs {
        let tried = attempts(&store, j);
        if pending.contains(&slurm_ids(&store, j)[0]) {
            never += 1;
            assert_eq!(tried, ["not_started", "done"], "{j}\n{err}");
        } else {
            assert!(tried == ["done"] || tried == ["crashed", "done"], "{j}: {tried:?}\n{err}");
        }
    }
    assert_eq!(never, pending.len(), "{pending:?}");
    equal_to_local(&store, &reference, &jobs, "Slurm results equal local ones");
}

/// A partition whose jobs a higher-priority partition preempts, in `mode` (with `REQUEUE`,
/// Slurm cancels the job: xlab submits with `--no-requeue`): the preempted xlab job stops at a
/// checkpoint on Slurm's signal, goes back in at once without using a retry (the stage has none),
/// waits for the other job, resumes from its checkpoint and ends as a local run does.
fn a_preempted_job_resumes(test: &str, mode: &str) {
    let Some(cluster) = cluster_with_or_skip(
        test,
        &format!(
            "PreemptType=preempt/partition_prio\nPreemptMode={mode}\n\
             PartitionName=low Nodes=ALL Default=YES PriorityTier=1 PreemptMode={mode} State=UP\n\
             PartitionName=high Nodes=ALL PriorityTier=2 State=UP\n"
        ),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("preempted.yaml");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The job takes every CPU of the node, so the high-priority job can run only in its place.
    std::fs::write(
        &file,
        SWEEP
            .replace("EPOCHS", "150")
            .replace("array_parallelism: 2", &format!("partition: low, cpus_per_job: {cpus}"))
            .replace("  erm:\n    seeds: 3\n    retries: 1\n", "")
            .replace("    retries: 1\n", "    retries: 0\n"),
    )
    .unwrap();
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");
    let child = cluster.run_in_background(&store, &file);
    let victim = job_past_epoch(&store, 2, &[], Duration::from_secs(120));
    let high = run(cluster.slurm("sbatch").args([
        "--parsable",
        "--partition=high",
        &format!("--cpus-per-task={cpus}"),
        "--output=/dev/null",
        "--wrap=sleep 3",
    ]))
    .unwrap();
    let out = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let log = std::fs::read_to_string(cluster.dir.path().join("log/slurmctld.log")).unwrap_or_default();
    assert!(err.contains("was preempted by Slurm for a job of higher priority"), "{err}\n{log}");
    assert!(err.contains("preemption does not count against `retries:`"), "{err}");
    assert!(err.contains("from its checkpoint after epoch"), "it resumed: {err}");
    assert_eq!(attempts(&store, &victim), ["preempted", "done"], "{err}");
    let state = run(cluster.slurm("squeue").args(["--noheader", "--states=all", "--format=%T", "--job", high.trim()]));
    assert_eq!(state.unwrap().trim(), "COMPLETED", "the high-priority job ran");
    let jobs = job_ids(&store, &file);
    equal_to_local(&store, &reference, &jobs, "the resumed job ends as a local run");
}

#[test]
fn a_job_preempted_under_requeue_resumes_from_its_checkpoint_without_using_a_retry() {
    a_preempted_job_resumes(
        "a_job_preempted_under_requeue_resumes_from_its_checkpoint_without_using_a_retry",
        "REQUEUE",
    );
}

#[test]
fn a_job_preempted_under_cancel_resumes_from_its_checkpoint_without_using_a_retry() {
    a_preempted_job_resumes("a_job_preempted_under_cancel_resumes_from_its_checkpoint_without_using_a_retry", "CANCEL");
}

/// Eight seeds four to an allocation (`pack: 4`), two side by side and two after them
/// (`pack_at_once: 2`): two array tasks instead of eight. One allocation is cancelled while its
/// first two jobs run: those resume from their checkpoints under `retries:`, the two that had not
/// started go back in as `not_started`, and every result equals a local run's.
#[test]
fn packed_jobs_share_allocations_and_keep_their_own_attempts() {
    let Some(cluster) = cluster_or_skip("packed_jobs_share_allocations_and_keep_their_own_attempts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packed.yaml");
    std::fs::write(
        &file,
        SWEEP
            .replace("EPOCHS", "12")
            .replace("array_parallelism: 2", "pack: 4, pack_at_once: 2, time: \"10:00\"")
            .replace("seeds: 3", "seeds: 8")
            .replace("  sam:\n    step_rule: {use: sam.sam, rho: 0.05}\n    retries: 1\n", ""),
    )
    .unwrap();
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");
    let child = cluster.run_in_background(&store, &file);
    let victim = job_past_epoch(&store, 2, &[], Duration::from_secs(120));
    let allocation = slurm_ids(&store, &victim)[0].clone();
    run(cluster.slurm("scancel").arg(&allocation)).unwrap();
    let out = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("4 jobs per allocation, 2 at once"), "{err}");

    let jobs = job_ids(&store, &file);
    assert_eq!(jobs.len(), 8);
    let firsts: Vec<String> = jobs.iter().map(|j| slurm_ids(&store, j)[0].clone()).collect();
    let mut allocations = firsts.clone();
    allocations.sort();
    allocations.dedup();
    assert_eq!(allocations.len(), 2, "eight jobs in two allocations: {firsts:?}");
    for a in &allocations {
        assert_eq!(firsts.iter().filter(|f| *f == a).count(), 4, "{firsts:?}");
    }
    // The first sbatch holds both allocations as one array of two tasks; the cancelled
    // allocation's jobs went in again, in later allocations.
    let script = std::fs::read_dir(store.join("slurm"))
        .unwrap()
        .flatten()
        .map(|f| f.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .min()
        .unwrap();
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains(" pack --tasks ") && text.contains("--at-once 2"), "{text}");
    let mut tried: Vec<Vec<String>> = Vec::new();
    for (j, first) in jobs.iter().zip(&firsts) {
        let a = attempts(&store, j);
        if *first == allocation {
            tried.push(a);
        } else {
            assert_eq!(a, ["done"], "{j}\n{err}");
        }
    }
    tried.sort();
    assert_eq!(
        tried,
        [vec!["crashed", "done"], vec!["crashed", "done"], vec!["not_started", "done"], vec!["not_started", "done"]],
        "{err}"
    );
    assert_eq!(err.matches("from its checkpoint after epoch").count(), 2, "both retries resumed: {err}");
    equal_to_local(&store, &reference, &jobs, "packed results equal local ones");
}

/// `xlab run --detach` submits the coordinator itself as a Slurm job and returns at once. While
/// it runs, `xlab status` and `xlab query` work from here against the store it owns (it also
/// serves other machines, `xlab.net`), and a second `--detach` is refused; `xlab attach` follows
/// its log to the end, and the results equal a local run's.
#[test]
fn a_detached_coordinator_runs_the_sweep_as_a_slurm_job() {
    let Some(cluster) = cluster_or_skip("a_detached_coordinator_runs_the_sweep_as_a_slurm_job") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = sweep(dir.path(), 25);
    let reference = local_reference(dir.path(), &file);
    let store = dir.path().join("results");
    let started = Instant::now();
    let out = cluster.xlab(&store).args(["run", "--executor", "slurm", "--detach"]).arg(&file).output().unwrap();
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(5), "returned in {took:?}");
    assert!(
        said.contains("submitted the coordinator of `on-slurm` as Slurm job ") && said.contains("xlab attach on-slurm"),
        "{said}"
    );

    job_past_epoch(&store, 1, &[], Duration::from_secs(120));
    assert!(store.join("xlab.net").exists(), "the coordinator serves other machines too");
    let status = cluster.xlab(&store).arg("status").output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && shown.contains("detached coordinator of `on-slurm`: Slurm job "), "{shown}");
    assert!(shown.contains("RUNNING"), "{shown}");
    let live = cluster.xlab(&store).args(["query", "-e", "on-slurm", "--format", "json"]).output().unwrap();
    assert!(live.status.success(), "{}", String::from_utf8_lossy(&live.stderr));
    let again = cluster.xlab(&store).args(["run", "--executor", "slurm", "--detach"]).arg(&file).output().unwrap();
    let refused = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && refused.contains("already runs on this store as Slurm job"), "{refused}");

    let attach = cluster.xlab(&store).args(["attach", "on-slurm"]).output().unwrap();
    let (log, err) = (String::from_utf8_lossy(&attach.stdout), String::from_utf8_lossy(&attach.stderr));
    assert!(attach.status.success(), "{log}{err}");
    assert!(log.contains("4 done, 0 skipped (already done), 0 failed"), "the coordinator's log: {log}");
    assert!(err.contains("ended: COMPLETED") && err.contains("`on-slurm`: 4 done"), "{err}");
    assert!(!store.join("xlab.net").exists(), "removed when the coordinator let go of the store");

    let jobs = job_ids(&store, &file);
    for j in &jobs {
        assert_eq!(attempts(&store, j), ["done"], "{j}");
    }
    equal_to_local(&store, &reference, &jobs, "a detached run ends as a local one");
}

/// A packed job that runs past its `timeout:` is killed alone: its pack's supervisor kills its
/// worker at the coordinator's request, where `scancel` would end the allocation (which then ends
/// COMPLETED, not CANCELLED). The job is recorded as `timeout`; its sibling, done before, as `done`.
#[test]
fn a_packed_job_past_its_timeout_is_killed_without_its_allocation() {
    let Some(cluster) = cluster_or_skip("a_packed_job_past_its_timeout_is_killed_without_its_allocation") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("timeout.yaml");
    std::fs::write(
        &file,
        "name: packed-timeout\nexecutor: {slurm: {poll_s: 0.25, pack: 2}}\ndefaults:\n  task: noop\n  \
         data: {name: two_moons}\nstages:\n  nap:\n    grid: {noop.sleep_s: [1, 120]}\n    timeout: 8\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cluster.xlab(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "one job failed: {err}");
    let jobs = job_ids(&store, &file);
    let firsts: Vec<String> = jobs.iter().map(|j| slurm_ids(&store, j)[0].clone()).collect();
    assert_eq!(firsts[0], firsts[1], "one allocation for both: {firsts:?}");
    let tried: Vec<Vec<String>> = jobs.iter().map(|j| attempts(&store, j)).collect();
    assert_eq!(tried, [vec!["done".to_string()], vec!["timeout".to_string()]], "{err}");
    assert!(err.contains("ran past its timeout of 8 s and was killed"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state =
            run(cluster.slurm("squeue").args(["--noheader", "--states=all", "--format=%T", "--job", &firsts[0]]))
                .unwrap_or_default();
        if state.trim() == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline && state.trim() != "CANCELLED", "the allocation ended {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

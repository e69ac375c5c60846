//! Several runs on one store and one device pool.
//!
//! The first `xlab run` on a store owns it (sled allows one process) and its device pool. A
//! later `xlab run` on the same store joins it instead of being refused: it plans and schedules
//! its own experiment, starts its own workers and prints its own progress, but takes its slots
//! from the owner's pool and writes its records through the owner (see `xlab_store::live`).
//! The [`Hub`] is the owner's side of that: the pool every run shares, so devices are never
//! oversubscribed and a ready job of a higher stage priority gets the next free slot whichever
//! run it belongs to; the claims on jobs, so a job two runs both plan (the same file run twice,
//! or more seeds of it) is run by one of them while the other waits for it and reports it; and
//! the owner's stop requests, which the joined runs follow, since the store goes away with the
//! owner.
//!
//! A joined run that ends or is killed gives back what it held: its connection to the owner
//! closes, and the hub releases its slots and claims (its workers, whose parent is gone, stop).

use crate::pool::{Held, Need, Pool, Slot, Slots};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xlab_store::live::{Host, RemoteStore};

/// The owner's own session.
const OWNER: u64 = 0;

/// How long a ready job's claim on the next free slot lasts unless its run repeats it (each
/// run's scheduler does, every loop turn, while the job waits).
const WANT_LASTS: Duration = Duration::from_secs(1);

/// A run on the store: the owner's or one joined to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub experiment: String,
    pub pid: u32,
    pub joined_unix: u64,
}

struct Session {
    member: Member,
    held: Vec<Held>,
}

struct State {
    pool: Pool,
    next: u64,
    sessions: BTreeMap<u64, Session>,
    /// Job id → the session running (or about to run) it.
    claims: HashMap<String, u64>,
    /// Per session, its best ready job that found no room: what it needs, its priority, when.
    wants: HashMap<u64, (Need, i32, Instant)>,
    /// The owner's stop requests so far, which every joined run follows.
    stops: usize,
}

/// The owner's pool, claims and stop requests, shared with the runs that join it.
pub struct Hub {
    state: Mutex<State>,
}

/// What a joined run learns each turn of its loop.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PeerTick {
    /// The owner's stop requests so far (Ctrl-C of the owner stops every run on the store).
    pub stops: usize,
    /// Jobs this run waited for that no other run holds any more: now claimed by this run.
    pub released: Vec<String>,
}

/// The other runs on the store, as one run's scheduler sees them.
pub trait Peers: Send + Sync {
    /// Claims `ids` for this run; returns those another run holds (this run waits for them).
    fn claim(&self, ids: &[String]) -> Result<Vec<String>, String>;
    /// Called every loop turn with the jobs this run waits for.
    fn tick(&self, waiting: &[String]) -> Result<PeerTick, String>;
    /// Whether the owner of the store went away (only a joined run's can).
    fn owner_gone(&self) -> bool {
        false
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Call {
    Take { need: Need, avoid: Option<String>, priority: i32 },
    Want { need: Need, priority: i32 },
    GiveBack { held: Held },
    Free,
    Pool,
    Claim { ids: Vec<String> },
    Tick { waiting: Vec<String> },
    Members,
}

#[derive(Debug, Serialize, Deserialize)]
struct PoolAnswer {
    slots: Vec<Slot>,
    describe: String,
}

impl Hub {
    /// A hub over `pool` for the owner's run of `experiment`.
    pub fn new(pool: Pool, experiment: &str) -> Arc<Hub> {
        let owner = Session {
            member: Member {
                experiment: experiment.into(),
                pid: std::process::id(),
                joined_unix: xlab_store::now_unix(),
            },
            held: Vec::new(),
        };
        Arc::new(Hub {
            state: Mutex::new(State {
                pool,
                next: OWNER + 1,
                sessions: BTreeMap::from([(OWNER, owner)]),
                claims: HashMap::new(),
                wants: HashMap::new(),
                stops: 0,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owner's slots.
    pub fn slots(self: &Arc<Self>) -> Box<dyn Slots> {
        let describe = self.state().pool.describe();
        Box::new(HubSlots { hub: Arc::clone(self), describe })
    }

    /// The owner's view of the other runs.
    pub fn peers(self: &Arc<Self>) -> Arc<dyn Peers> {
        Arc::new(HubPeers(Arc::clone(self)))
    }

    /// Passes the owner's stop requests on to the joined runs.
    pub fn set_stops(&self, stops: usize) {
        self.state().stops = stops;
    }

    /// The owner's run ended: its claims go to whoever waits for them.
    pub fn owner_done(&self) {
        self.state().claims.retain(|_, s| *s != OWNER);
    }

    /// The runs joined now (not the owner).
    pub fn joined(&self) -> Vec<Member> {
        self.state().sessions.iter().filter(|(s, _)| **s != OWNER).map(|(_, m)| m.member.clone()).collect()
    }

    /// Every run on the store: the owner first.
    pub fn members(&self) -> Vec<Member> {
        self.state().sessions.values().map(|m| m.member.clone()).collect()
    }

    fn take(&self, session: u64, need: Need, avoid: Option<&str>, priority: i32) -> Option<Held> {
        let mut st = self.state();
        let now = Instant::now();
        st.wants.retain(|_, (_, _, at)| now.duration_since(*at) < WANT_LASTS);
        // Another run's ready job that fits now goes first if its stage priority is higher, or
        // equal while that run holds fewer slots: runs of equal priority share the pool evenly.
        let st = &mut *st;
        let holds = |s: u64| st.sessions.get(&s).map_or(0, |m| m.held.iter().map(|h| h.slots.len()).sum::<usize>());
        let mine = holds(session);
        let yields = st.wants.iter().any(|(&s, &(n, p, _))| {
            s != session && (p > priority || (p == priority && holds(s) < mine)) && st.pool.fits_now(n)
        });
        if yields {
            return None;
        }
        let held = st.pool.take(need, avoid)?;
        if st.wants.get(&session).is_some_and(|(_, p, _)| *p <= priority) {
            st.wants.remove(&session);
        }
        st.sessions.get_mut(&session)?.held.push(held.clone());
        Some(held)
    }

    fn want(&self, session: u64, need: Need, priority: i32) {
        let mut st = self.state();
        let now = Instant::now();
        match st.wants.get_mut(&session) {
            Some(w) if w.1 > priority && now.duration_since(w.2) < WANT_LASTS => {}
            _ => {
                st.wants.insert(session, (need, priority, now));
            }
        }
    }

    fn give_back(&self, session: u64, held: &Held) {
        let mut st = self.state();
        let Some(s) = st.sessions.get_mut(&session) else { return };
        let Some(at) = s.held.iter().position(|h| h == held) else { return };
        s.held.remove(at);
        st.pool.give_back(held);
    }

    fn claim(&self, session: u64, ids: &[String]) -> Vec<String> {
        let mut st = self.state();
        let mut elsewhere = Vec::new();
        for id in ids {
            match st.claims.get(id) {
                Some(&s) if s != session => elsewhere.push(id.clone()),
                _ => {
                    st.claims.insert(id.clone(), session);
                }
            }
        }
        elsewhere
    }

    fn tick(&self, session: u64, waiting: &[String]) -> PeerTick {
        let mut st = self.state();
        let mut released = Vec::new();
        for id in waiting {
            if !st.claims.contains_key(id) {
                st.claims.insert(id.clone(), session);
                released.push(id.clone());
            }
        }
        PeerTick { stops: st.stops, released }
    }

    fn dispatch(&self, session: u64, call: Call) -> serde_json::Value {
        use serde_json::{json, to_value};
        match call {
            Call::Take { need, avoid, priority } => json!(self.take(session, need, avoid.as_deref(), priority)),
            Call::Want { need, priority } => {
                self.want(session, need, priority);
                json!(null)
            }
            Call::GiveBack { held } => {
                self.give_back(session, &held);
                json!(null)
            }
            Call::Free => json!(self.state().pool.free()),
            Call::Pool => {
                let st = self.state();
                to_value(PoolAnswer { slots: st.pool.slots().to_vec(), describe: st.pool.describe() })
                    .expect("serializes")
            }
            Call::Claim { ids } => json!(self.claim(session, &ids)),
            Call::Tick { waiting } => to_value(self.tick(session, &waiting)).expect("serializes"),
            Call::Members => to_value(self.members()).expect("serializes"),
        }
    }
}

impl Host for Hub {
    fn join(&self, experiment: &str, pid: u32) -> Result<u64, String> {
        let mut st = self.state();
        if st.pool.is_empty() {
            return Err("the run that owns this store submits its jobs to Slurm and has no device pool to share; \
                        wait for it, or run with --store DIR"
                .into());
        }
        let session = st.next;
        st.next += 1;
        let member = Member { experiment: experiment.into(), pid, joined_unix: xlab_store::now_unix() };
        st.sessions.insert(session, Session { member, held: Vec::new() });
        Ok(session)
    }

    fn call(&self, session: u64, call: serde_json::Value) -> Result<serde_json::Value, String> {
        let call: Call = serde_json::from_value(call).map_err(|e| format!("not a scheduler call: {e}"))?;
        Ok(self.dispatch(session, call))
    }

    fn left(&self, session: u64) {
        let mut st = self.state();
        let Some(s) = st.sessions.remove(&session) else { return };
        for held in &s.held {
            st.pool.give_back(held);
        }
        st.claims.retain(|_, c| *c != session);
        st.wants.remove(&session);
        if !s.held.is_empty() {
            tracing::info!(
                "the run of `{}` (pid {}) on this store ended; its {} slot lease(s) are free again",
                s.member.experiment,
                s.member.pid,
                s.held.len()
            );
        }
    }

    fn is_member(&self, session: u64) -> bool {
        session != OWNER && self.state().sessions.contains_key(&session)
    }
}

/// The owner's slots: the hub's pool.
struct HubSlots {
    hub: Arc<Hub>,
    describe: String,
}

impl Slots for HubSlots {
    fn take(&mut self, need: Need, avoid: Option<&str>, priority: i32) -> Option<Held> {
        self.hub.take(OWNER, need, avoid, priority)
    }
    fn wanting(&mut self, need: Need, priority: i32) {
        self.hub.want(OWNER, need, priority)
    }
    fn give_back(&mut self, held: &Held) {
        self.hub.give_back(OWNER, held)
    }
    fn free(&self) -> usize {
        self.hub.state().pool.free()
    }
    fn len(&self) -> usize {
        self.hub.state().pool.len()
    }
    fn slot(&self, i: usize) -> Slot {
        self.hub.state().pool.slot(i).clone()
    }
    fn never_fits(&self, need: Need) -> Option<String> {
        self.hub.state().pool.never_fits(need)
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }
}

struct HubPeers(Arc<Hub>);

impl Peers for HubPeers {
    fn claim(&self, ids: &[String]) -> Result<Vec<String>, String> {
        Ok(self.0.claim(OWNER, ids))
    }
    fn tick(&self, waiting: &[String]) -> Result<PeerTick, String> {
        Ok(self.0.tick(OWNER, waiting))
    }
}

/// A joined run's side: the owner's pool and claims, through its socket.
pub struct Joined {
    store: Arc<RemoteStore>,
    slots: Vec<Slot>,
    describe: String,
}

impl Joined {
    /// Joins the owner of `store` with a run of `experiment`.
    pub fn join(store: Arc<RemoteStore>, experiment: &str) -> Result<Joined, String> {
        store.join(experiment, std::process::id()).map_err(|e| e.to_string())?;
        let pool: PoolAnswer = serde_json::from_value(call(&store, Call::Pool)?).map_err(|e| e.to_string())?;
        Ok(Joined { store, slots: pool.slots, describe: pool.describe })
    }

    /// The pool this run's jobs take slots from.
    pub fn slots(&self) -> Box<dyn Slots> {
        Box::new(RemoteSlots {
            store: Arc::clone(&self.store),
            slots: self.slots.clone(),
            describe: self.describe.clone(),
        })
    }

    pub fn peers(&self) -> Arc<dyn Peers> {
        Arc::new(RemotePeers(Arc::clone(&self.store)))
    }

    /// Every run on the store, the owner first.
    pub fn members(&self) -> Result<Vec<Member>, String> {
        serde_json::from_value(call(&self.store, Call::Members)?).map_err(|e| e.to_string())
    }
}

fn call(store: &RemoteStore, c: Call) -> Result<serde_json::Value, String> {
    store.call(serde_json::to_value(c).expect("calls serialize")).map_err(|e| e.to_string())
}

struct RemoteSlots {
    store: Arc<RemoteStore>,
    slots: Vec<Slot>,
    describe: String,
}

impl Slots for RemoteSlots {
    fn take(&mut self, need: Need, avoid: Option<&str>, priority: i32) -> Option<Held> {
        let answer = call(&self.store, Call::Take { need, avoid: avoid.map(str::to_string), priority }).ok()?;
        serde_json::from_value(answer).ok().flatten()
    }
    fn wanting(&mut self, need: Need, priority: i32) {
        let _ = call(&self.store, Call::Want { need, priority });
    }
    fn give_back(&mut self, held: &Held) {
        // If the owner went away, so did its pool.
        let _ = call(&self.store, Call::GiveBack { held: held.clone() });
    }
    fn free(&self) -> usize {
        call(&self.store, Call::Free).ok().and_then(|v| v.as_u64()).unwrap_or(0) as usize
    }
    fn len(&self) -> usize {
        self.slots.len()
    }
    fn slot(&self, i: usize) -> Slot {
        self.slots[i].clone()
    }
    fn never_fits(&self, need: Need) -> Option<String> {
        Pool::new(self.slots.clone()).never_fits(need)
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }
}

struct RemotePeers(Arc<RemoteStore>);

impl Peers for RemotePeers {
    fn claim(&self, ids: &[String]) -> Result<Vec<String>, String> {
        serde_json::from_value(call(&self.0, Call::Claim { ids: ids.to_vec() })?).map_err(|e| e.to_string())
    }
    fn tick(&self, waiting: &[String]) -> Result<PeerTick, String> {
        serde_json::from_value(call(&self.0, Call::Tick { waiting: waiting.to_vec() })?).map_err(|e| e.to_string())
    }
    fn owner_gone(&self) -> bool {
        self.0.owner_gone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_higher_priority_want_of_another_run_goes_first_and_leaving_frees_everything() {
        let hub = Hub::new(Pool::cpu(2, 1), "a");
        let guest = hub.join("b", 42).unwrap();
        let one = Need::one();
        let a = hub.take(OWNER, one, None, 0).unwrap();
        // The guest's priority-1 job waits for a slot; the owner's priority-0 job may not take it.
        hub.want(guest, one, 1);
        assert_eq!(hub.take(OWNER, one, None, 0), None);
        let g = hub.take(guest, one, None, 1).unwrap();
        assert_eq!(hub.state().pool.free(), 0);
        hub.give_back(OWNER, &a);
        // The want is gone once served: the owner takes the freed slot.
        assert!(hub.take(OWNER, one, None, 0).is_some());
        hub.left(guest);
        assert_eq!(hub.state().pool.free(), 1, "the guest's slot is free once it left");
        assert!(!hub.is_member(guest));
        let _ = g;
    }

    #[test]
    fn runs_of_equal_priority_share_the_pool_evenly() {
        let hub = Hub::new(Pool::cpu(4, 1), "a");
        let guest = hub.join("b", 42).unwrap();
        let one = Need::one();
        let first: Vec<Held> = (0..3).map(|_| hub.take(OWNER, one, None, 0).unwrap()).collect();
        hub.want(guest, one, 0);
        // The owner holds 3, the guest none: the last slot waits for the guest.
        assert_eq!(hub.take(OWNER, one, None, 0), None);
        assert!(hub.take(guest, one, None, 0).is_some());
        hub.give_back(OWNER, &first[0]);
        // Now 2 against 1: the owner may take the freed slot unless the guest wants it.
        hub.want(guest, one, 0);
        assert_eq!(hub.take(OWNER, one, None, 0), None, "the guest holds fewer");
        assert!(hub.take(guest, one, None, 0).is_some());
    }

    #[test]
    fn a_job_claimed_by_one_run_is_waited_for_by_another_and_passes_on_when_it_leaves() {
        let hub = Hub::new(Pool::cpu(1, 1), "a");
        assert!(hub.claim(OWNER, &["j1".into(), "j2".into()]).is_empty());
        let guest = hub.join("a", 42).unwrap();
        assert_eq!(hub.claim(guest, &["j2".into(), "j3".into()]), vec!["j2".to_string()]);
        assert!(hub.tick(guest, &["j2".into()]).released.is_empty());
        hub.set_stops(1);
        hub.owner_done();
        let t = hub.tick(guest, &["j2".into()]);
        assert_eq!((t.stops, t.released), (1, vec!["j2".to_string()]));
        // A second guest now waits for the first.
        let other = hub.join("a", 43).unwrap();
        assert_eq!(hub.claim(other, &["j2".into()]), vec!["j2".to_string()]);
        hub.left(guest);
        assert_eq!(hub.tick(other, &["j2".into()]).released, vec!["j2".to_string()]);
    }

    #[test]
    fn a_slurm_owner_takes_no_guests() {
        let hub = Hub::new(Pool::new(Vec::new()), "a");
        assert!(hub.join("b", 1).unwrap_err().contains("Slurm"));
    }
}

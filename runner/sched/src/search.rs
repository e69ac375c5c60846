//! The adaptive search of a stage (`search:`): asynchronous successive halving (ASHA, Li et al.
//! 2020, "A System for Massively Parallel Hyperparameter Tuning"), which is also one bracket of
//! Hyperband and the early stopping of TPE.
//!
//! Every trial (a job of the stage) has the full budget of epochs; the rungs are the epochs it
//! pauses at (`min_epochs`, `min_epochs·η`, … and the budget). A paused trial holds its
//! checkpoint, so promoting it continues training from there, never from the start. Whenever a
//! slot is free, the search promotes the best paused trial of the highest rung whose rank among
//! every trial that reached that rung is within the best ⌊n/η⌋; if none qualifies it starts the
//! next new trial (under TPE, it first proposes one: [`Asha::propose`]). Once nothing runs,
//! nothing is new and nothing qualifies, the best paused trial of the highest rung goes on if no
//! trial reached the end yet, and then the paused trials are pruned.
//!
//! Every proposal, start, promotion and pruning is a [`Decision`], written to the store before it
//! is acted on, with the numbers it rests on. The decisions and the trials' metric series are the
//! whole state: a run that starts again rebuilds the search from them ([`Asha::rebuild`]) and
//! never contradicts one. Pure logic: no process, store or clock.

use crate::tpe;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use xlab_plan::file::Mode;
use xlab_plan::sweep::Dist;
use xlab_plan::Search;
use xlab_store::{Decision, DecisionKind};

/// A TPE search's proposals: each trial's point in TPE's terms.
struct Proposer {
    /// The space's dimensions, in key order, as TPE sees them.
    dims: Vec<tpe::Dim>,
    /// Per trial (job index), its point.
    params: HashMap<usize, Vec<f64>>,
    /// No new point could be found (every proposal repeated an earlier trial).
    exhausted: bool,
}

/// How often a proposal that repeats an earlier trial's point is drawn again.
const REDRAWS: u64 = 20;

/// What a search wants done on a free slot.
pub(crate) enum Next {
    /// Run trial `0` (start or promote it), recording the decision first.
    Run(usize, Decision),
    /// Make a new trial at this point (TPE): `attempt` counts redraws of a repeated point.
    Propose { point: Vec<(String, Value)>, params: Vec<f64>, based_on: u32, attempt: u64 },
}

/// One stage's search.
pub(crate) struct Asha {
    pub(crate) experiment: String,
    pub(crate) stage: String,
    pub(crate) spec: Search,
    /// The trials (job indices), in plan order.
    pub(crate) trials: Vec<usize>,
    /// Trials whose parents are done and that have not started, in plan order.
    fresh: VecDeque<usize>,
    /// Per trial, its metric at each rung it reached, in rung order.
    results: HashMap<usize, Vec<f64>>,
    /// (trial, rung) it was promoted from.
    promoted: HashSet<(usize, usize)>,
    /// Trials queued or running, and the rung they head for.
    heading: HashMap<usize, usize>,
    /// Trials paused at the last rung they reached.
    paused: BTreeSet<usize>,
    started: HashSet<usize>,
    pruned: HashSet<usize>,
    /// Trials that ended without reaching a rung (failed, or blocked by a failed parent).
    failed: HashSet<usize>,
    /// The search metric each trial logged, by epoch.
    seen: HashMap<usize, BTreeMap<u64, f64>>,
    /// The next decision's place in the stage's log, shared by a stage's brackets.
    seq: std::rc::Rc<std::cell::Cell<u64>>,
    /// The Hyperband bracket it is, if it is one.
    pub(crate) bracket: Option<u32>,
    /// Its trials, as a set.
    members: HashSet<usize>,
    /// Why the search cannot go on (its metric is missing), once it cannot.
    pub(crate) broken: Option<String>,
    proposer: Option<Proposer>,
}

struct Promotion {
    trial: usize,
    rung: usize,
    value: f64,
    rank: u32,
    of: u32,
    keep: u32,
}

/// What a search did, for the report at the end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSummary {
    pub stage: String,
    /// The Hyperband bracket it sums up, if it is one.
    pub bracket: Option<u32>,
    pub metric: String,
    pub trials: usize,
    /// Epochs trained over every trial, and what the exhaustive sweep would have trained.
    pub epochs_used: u64,
    pub epochs_full: u64,
    pub finished: usize,
    pub pruned: usize,
    /// Per rung below the top: its epoch, how many trials reached both it and the end, and the
    /// Spearman correlation of their metric there with their final metric (with 3 or more).
    pub rung_vs_final: Vec<(u64, usize, Option<f64>)>,
    /// The best trial that reached the end, and its final metric.
    pub best: Option<(usize, f64)>,
    /// Why the search stopped before its end, if it did.
    pub broken: Option<String>,
}

impl Asha {
    pub(crate) fn new(experiment: &str, stage: &str, spec: Search, trials: Vec<usize>) -> Asha {
        let members = trials.iter().copied().collect();
        Asha {
            experiment: experiment.into(),
            stage: stage.into(),
            spec,
            trials,
            fresh: VecDeque::new(),
            results: HashMap::new(),
            promoted: HashSet::new(),
            heading: HashMap::new(),
            paused: BTreeSet::new(),
            started: HashSet::new(),
            pruned: HashSet::new(),
            failed: HashSet::new(),
            seen: HashMap::new(),
            seq: Default::default(),
            bracket: None,
            members,
            broken: None,
            proposer: None,
        }
    }

    /// Bracket `b` of a Hyperband search, whose brackets number their decisions with `seq`.
    pub(crate) fn in_bracket(mut self, b: Option<u32>, seq: std::rc::Rc<std::cell::Cell<u64>>) -> Asha {
        self.bracket = b;
        self.seq = seq;
        self
    }

    /// A TPE search: `points` are its trials so far (job index and point, in trial order).
    pub(crate) fn proposing(mut self, points: &[(usize, &[(String, Value)])]) -> Asha {
        let Some(t) = &self.spec.tpe else { return self };
        let dims: Vec<tpe::Dim> = t
            .space
            .iter()
            .map(|(_, d)| match d {
                Dist::Uniform(a, b) => tpe::Dim::Float { low: *a, high: *b, log: false },
                Dist::LogUniform(a, b) => tpe::Dim::Float { low: *a, high: *b, log: true },
                Dist::Int(a, b) => tpe::Dim::Int { low: *a, high: *b },
                Dist::Choice(items) => tpe::Dim::Choice(items.len()),
            })
            .collect();
        let mut params = HashMap::new();
        for (job, point) in points {
            let p: Option<Vec<f64>> = t
                .space
                .iter()
                .map(|(k, d)| {
                    let v = point.iter().find(|(pk, _)| pk == k).map(|(_, v)| v)?;
                    match d {
                        Dist::Choice(items) => items.iter().position(|i| i == v).map(|i| i as f64),
                        _ => v.as_f64(),
                    }
                })
                .collect();
            if let Some(p) = p {
                params.insert(*job, p);
            }
        }
        self.proposer = Some(Proposer { dims, params, exhausted: false });
        self
    }

    /// Whether the search proposes more trials as it runs.
    fn proposes_more(&self) -> bool {
        match (&self.proposer, &self.spec.tpe) {
            (Some(p), Some(t)) => !p.exhausted && self.trials.len() < t.trials as usize,
            _ => false,
        }
    }

    /// TPE's next point (redrawn `attempt` times so far because it repeated an earlier trial),
    /// from the trials in trial order: finished ones with their final value, pruned or paused
    /// ones with their last rung's, failed ones left out and the rest running.
    pub(crate) fn propose(&self, attempt: u64) -> Option<Next> {
        let (p, t) = (self.proposer.as_ref()?, self.spec.tpe.as_ref()?);
        if attempt >= REDRAWS {
            return None;
        }
        let top = self.top();
        let mut history = Vec::new();
        for trial in &self.trials {
            let Some(params) = p.params.get(trial) else { continue };
            if self.failed.contains(trial) {
                continue;
            }
            let r = self.results.get(trial);
            let state = if let Some(v) = r.and_then(|r| r.get(top)) {
                if v.is_nan() {
                    continue;
                }
                tpe::State::Complete(*v)
            } else if self.pruned.contains(trial) || self.paused.contains(trial) {
                // A trial paused at a rung has stopped there unless it is promoted later: TPE
                // sees it as Optuna sees a pruned trial, by its last rung's value.
                let last = r.and_then(|r| r.last().map(|v| (self.spec.rungs[r.len() - 1], *v)));
                tpe::State::Pruned(last)
            } else {
                tpe::State::Running
            };
            history.push(tpe::Trial { params: params.clone(), state });
        }
        let based_on = history.iter().filter(|h| h.state != tpe::State::Running).count() as u32;
        let direction = if self.spec.mode == Mode::Max { tpe::Direction::Maximize } else { tpe::Direction::Minimize };
        let number = self.trials.len() as u64;
        let seed = tpe::trial_seed(t.seed.wrapping_add(attempt << 40), number);
        let params = tpe::suggest(&p.dims, &history, direction, t.startup as usize, seed);
        let point = t
            .space
            .iter()
            .zip(&params)
            .map(|((k, d), &v)| {
                let value = match d {
                    Dist::Uniform(..) | Dist::LogUniform(..) => Value::from(v),
                    Dist::Int(..) => Value::from(v as i64),
                    Dist::Choice(items) => items[v as usize].clone(),
                };
                (k.clone(), value)
            })
            .collect();
        Some(Next::Propose { point, params, based_on, attempt })
    }

    /// A proposal became trial `job`: the decision to record before it runs.
    pub(crate) fn proposed(
        &mut self,
        job: usize,
        id: &str,
        point: &[(String, Value)],
        params: Vec<f64>,
        based_on: u32,
    ) -> Decision {
        self.trials.push(job);
        self.members.insert(job);
        if let Some(p) = &mut self.proposer {
            p.params.insert(job, params);
        }
        let mut d = self.decision(DecisionKind::Suggest, id, 0);
        d.params = Some(point.iter().cloned().collect());
        d.based_on = Some(based_on);
        let random = self.spec.tpe.as_ref().is_some_and(|t| based_on < t.startup);
        d.method = Some(if random { "random" } else { "tpe" }.into());
        d
    }

    /// No new point could be found: the search runs the trials it has.
    pub(crate) fn exhausted(&mut self) {
        if let Some(p) = &mut self.proposer {
            p.exhausted = true;
        }
    }

    fn top(&self) -> usize {
        self.spec.rungs.len() - 1
    }

    /// Rebuilds the state from the decisions recorded so far and each trial's logged metric
    /// (`series`: by trial, (epoch, value)) and whether it is done. Returns the trials to run
    /// now (started or promoted before, not yet at the rung they head for) and those a recorded
    /// pruning names whose record does not say so yet.
    pub(crate) fn rebuild(
        &mut self,
        decisions: &[Decision],
        series: &HashMap<usize, Vec<(u64, f64)>>,
        done: &dyn Fn(usize) -> bool,
        index_of: &dyn Fn(&str) -> Option<usize>,
    ) -> (Vec<usize>, Vec<usize>) {
        self.seq.set(self.seq.get().max(decisions.iter().map(|d| d.seq + 1).max().unwrap_or(0)));
        for d in decisions {
            let Some(t) = index_of(&d.trial).filter(|t| self.members.contains(t)) else { continue };
            match d.kind {
                DecisionKind::Suggest => {}
                DecisionKind::Start => {
                    self.started.insert(t);
                }
                DecisionKind::Promote => {
                    self.promoted.insert((t, d.rung as usize));
                }
                DecisionKind::Prune => {
                    self.pruned.insert(t);
                }
            }
        }
        let mut run_now = Vec::new();
        let mut prune_now = Vec::new();
        for &t in &self.trials.clone() {
            if let Some(points) = series.get(&t) {
                self.seen.insert(t, points.iter().copied().collect());
            }
            if !self.started.contains(&t) {
                continue;
            }
            let reached: Vec<f64> =
                self.spec.rungs.iter().map_while(|r| self.seen.get(&t).and_then(|s| s.get(r)).copied()).collect();
            let target = (0..self.top()).filter(|&k| self.promoted.contains(&(t, k))).map(|k| k + 1).max().unwrap_or(0);
            let reached_target = reached.len() > target;
            // It logged the last rung's epoch but is not done: stopped while finishing (the
            // final evaluation, its weights), so it runs on to its end.
            let finishing = reached.len() > self.top();
            self.results.insert(t, reached);
            if self.pruned.contains(&t) {
                prune_now.push(t);
            } else if done(t) {
                // Done: it reached the top.
            } else if reached_target && !finishing {
                self.paused.insert(t);
            } else {
                self.heading.insert(t, if finishing { self.top() } else { target });
                run_now.push(t);
            }
        }
        (run_now, prune_now)
    }

    pub(crate) fn has_started(&self, t: usize) -> bool {
        self.started.contains(&t)
    }

    /// Trial `t`'s parents are done: it may start.
    pub(crate) fn ready(&mut self, t: usize) {
        if !self.started.contains(&t) && !self.fresh.contains(&t) {
            self.fresh.push_back(t);
        }
    }

    /// Trial `t` will not run (a failed parent blocks it).
    pub(crate) fn blocked(&mut self, t: usize) {
        self.failed.insert(t);
    }

    /// Whether `t` is queued or running for this search.
    pub(crate) fn is_heading(&self, t: usize) -> bool {
        self.heading.contains_key(&t)
    }

    /// The epoch trial `t` pauses after, if it heads for a rung below the top.
    pub(crate) fn pause_at(&self, t: usize) -> Option<u64> {
        self.heading.get(&t).filter(|&&k| k < self.top()).map(|&k| self.spec.rungs[k])
    }

    /// A metrics row of trial `t`.
    pub(crate) fn saw(&mut self, t: usize, step: u64, values: &BTreeMap<String, f64>) {
        if let Some(v) = values.get(&self.spec.metric) {
            self.seen.entry(t).or_default().insert(step, *v);
        }
    }

    /// The metric trial `t` logged at `epoch`, or why there is none.
    fn value_at(&self, t: usize, epoch: u64) -> Result<f64, String> {
        self.seen.get(&t).and_then(|s| s.get(&epoch)).copied().ok_or_else(|| {
            format!(
                "`search.metric` `{}` was not logged at epoch {epoch} (a search ranks trials by a metric they log at \
                 the end of every epoch: `val.acc`, `val.loss`, `train.loss`, …; a `val.` metric needs a validation \
                 split)",
                self.spec.metric
            )
        })
    }

    /// Trial `t` stopped at the rung it headed for.
    pub(crate) fn paused(&mut self, t: usize) -> Result<(u64, f64), String> {
        let k = self.heading.remove(&t).unwrap_or(0);
        let epoch = self.spec.rungs[k];
        let v = self.value_at(t, epoch)?;
        let r = self.results.entry(t).or_default();
        r.truncate(k);
        r.push(v);
        self.paused.insert(t);
        Ok((epoch, v))
    }

    /// Trial `t` trained to the end.
    pub(crate) fn finished(&mut self, t: usize) {
        self.heading.remove(&t);
        let top = *self.spec.rungs.last().expect("a search has rungs");
        let all: Vec<f64> =
            self.spec.rungs.iter().map_while(|r| self.seen.get(&t).and_then(|s| s.get(r)).copied()).collect();
        if all.len() == self.spec.rungs.len() {
            self.results.insert(t, all);
        } else if let Ok(v) = self.value_at(t, top) {
            self.results.entry(t).or_default().push(v);
        }
    }

    /// Trial `t` failed for good.
    pub(crate) fn failed(&mut self, t: usize) {
        self.heading.remove(&t);
        self.failed.insert(t);
    }

    /// The trials that reached rung `k`, best first (ties in plan order; NaN last).
    fn ranking(&self, k: usize) -> Vec<(usize, f64)> {
        let mut at: Vec<(usize, f64)> =
            self.trials.iter().filter_map(|t| self.results.get(t).and_then(|r| r.get(k)).map(|v| (*t, *v))).collect();
        let mode = self.spec.mode;
        at.sort_by(|a, b| {
            let key = |v: f64| {
                if v.is_nan() {
                    f64::NEG_INFINITY
                } else if mode == Mode::Max {
                    v
                } else {
                    -v
                }
            };
            key(b.1).total_cmp(&key(a.1))
        });
        at
    }

    fn decision(&mut self, kind: DecisionKind, trial: &str, k: usize) -> Decision {
        let d = Decision {
            experiment: self.experiment.clone(),
            stage: self.stage.clone(),
            seq: self.seq.get(),
            kind,
            trial: trial.into(),
            rung: k as u32,
            epoch: self.spec.rungs[k],
            value: None,
            rank: None,
            of: None,
            keep: None,
            params: None,
            based_on: None,
            method: None,
            bracket: self.bracket,
        };
        self.seq.set(self.seq.get() + 1);
        d
    }

    /// The promotion due now, if any: the best paused trial of the highest rung that ranks
    /// within the best ⌊n/η⌋ of the n trials that reached that rung.
    fn promotion(&self) -> Option<Promotion> {
        let eta = self.spec.reduction as usize;
        for k in (0..self.top()).rev() {
            let ranking = self.ranking(k);
            let keep = ranking.len() / eta;
            let pick = ranking.iter().enumerate().take(keep).find(|(_, (t, _))| {
                self.paused.contains(t)
                    && self.results.get(t).map_or(0, Vec::len) == k + 1
                    && !self.promoted.contains(&(*t, k))
            });
            if let Some((rank, &(trial, value))) = pick {
                return Some(Promotion {
                    trial,
                    rung: k,
                    value,
                    rank: rank as u32 + 1,
                    of: ranking.len() as u32,
                    keep: keep as u32,
                });
            }
        }
        None
    }

    /// Nothing of the search runs, waits to start or is still to be proposed.
    fn idle(&self) -> bool {
        self.heading.is_empty()
            && self.fresh.is_empty()
            && !self.proposes_more()
            && self.broken.is_none()
            && self
                .trials
                .iter()
                .all(|t| self.started.contains(t) || self.failed.contains(t) || self.pruned.contains(t))
    }

    /// The promotion due now: one that qualifies; or, once the search is idle and no trial has
    /// reached the end (too few trials for ⌊n/η⌋ to keep one at some rung), the best paused
    /// trial of the highest rung, so that a search always trains its best trial to the end.
    fn due(&self) -> Option<Promotion> {
        if let Some(p) = self.promotion() {
            return Some(p);
        }
        let top = self.top();
        if !self.idle() || self.results.values().any(|r| r.len() > top) {
            return None;
        }
        (0..top).rev().find_map(|k| {
            let ranking = self.ranking(k);
            let (rank, &(trial, value)) = ranking.iter().enumerate().find(|(_, (t, _))| {
                self.paused.contains(t)
                    && self.results.get(t).map_or(0, Vec::len) == k + 1
                    && !self.promoted.contains(&(*t, k))
            })?;
            Some(Promotion { trial, rung: k, value, rank: rank as u32 + 1, of: ranking.len() as u32, keep: 1 })
        })
    }

    /// The next trial to run on a free slot, and the decision to record first: the best
    /// qualifying promotion from the highest rung, else the next new trial.
    pub(crate) fn next(&mut self, id: &dyn Fn(usize) -> String) -> Option<Next> {
        if self.broken.is_some() {
            return None;
        }
        if let Some(p) = self.due() {
            let mut d = self.decision(DecisionKind::Promote, &id(p.trial), p.rung);
            d.value = Some(p.value);
            d.rank = Some(p.rank);
            d.of = Some(p.of);
            d.keep = Some(p.keep);
            self.promoted.insert((p.trial, p.rung));
            self.paused.remove(&p.trial);
            self.heading.insert(p.trial, p.rung + 1);
            return Some(Next::Run(p.trial, d));
        }
        let Some(t) = self.fresh.pop_front() else {
            return if self.proposes_more() { self.propose(0) } else { None };
        };
        let d = self.decision(DecisionKind::Start, &id(t), 0);
        self.started.insert(t);
        self.heading.insert(t, 0);
        Some(Next::Run(t, d))
    }

    /// Once nothing of the search runs or waits to start and nothing more can be promoted:
    /// prunes the paused trials (the decisions, in plan order).
    pub(crate) fn settle(&mut self, id: &dyn Fn(usize) -> String) -> Vec<(usize, Decision)> {
        if !self.idle() || self.paused.is_empty() || self.due().is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Each rung's ranks once (trial → rank, and how many reached it), however many trials
        // are pruned there.
        let mut ranks: HashMap<usize, (HashMap<usize, u32>, usize)> = HashMap::new();
        for t in std::mem::take(&mut self.paused) {
            let k = self.results.get(&t).map_or(0, Vec::len).saturating_sub(1);
            let (rank_of, of) = ranks.entry(k).or_insert_with(|| {
                let ranking = self.ranking(k);
                let n = ranking.len();
                (ranking.into_iter().enumerate().map(|(p, (r, _))| (r, p as u32 + 1)).collect(), n)
            });
            let (rank, of) = (rank_of.get(&t).copied(), *of);
            let mut d = self.decision(DecisionKind::Prune, &id(t), k);
            d.value = self.results.get(&t).and_then(|r| r.get(k)).copied();
            d.rank = rank;
            d.of = Some(of as u32);
            d.keep = Some((of / self.spec.reduction as usize) as u32);
            self.pruned.insert(t);
            out.push((t, d));
        }
        out
    }

    /// What the search did so far.
    pub(crate) fn summary(&self) -> SearchSummary {
        let top = self.top();
        let epochs_of = |t: &usize| -> u64 {
            let reached = self.results.get(t).map_or(0, Vec::len);
            let by_rung = if reached == 0 { 0 } else { self.spec.rungs[reached - 1] };
            by_rung.max(self.seen.get(t).and_then(|s| s.keys().next_back().copied()).unwrap_or(0))
        };
        let ended: Vec<usize> =
            self.trials.iter().copied().filter(|t| self.results.get(t).is_some_and(|r| r.len() > top)).collect();
        let rung_vs_final = (0..top)
            .map(|k| {
                let pairs: Vec<(f64, f64)> = ended.iter().map(|t| (self.results[t][k], self.results[t][top])).collect();
                (self.spec.rungs[k], pairs.len(), (pairs.len() >= 3).then(|| spearman(&pairs)).flatten())
            })
            .collect();
        let best = self.ranking(top).first().map(|&(t, v)| (t, v));
        SearchSummary {
            stage: self.stage.clone(),
            bracket: self.bracket,
            metric: self.spec.metric.clone(),
            trials: self.trials.len(),
            epochs_used: self.trials.iter().map(epochs_of).sum(),
            epochs_full: self.spec.budget(self.trials.len()).0,
            finished: ended.len(),
            pruned: self.pruned.len(),
            rung_vs_final,
            best,
            broken: self.broken.clone(),
        }
    }
}

/// Ranks (1-based, ties averaged).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson's of the ranks, ties averaged, as scipy's
/// `spearmanr`); `None` when either side is constant.
pub(crate) fn spearman(pairs: &[(f64, f64)]) -> Option<f64> {
    let a = ranks(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let b = ranks(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_stopped_after_its_last_epoch_but_before_done_runs_on_to_its_end() {
        // Trial 0 started and was promoted twice; its series reaches epoch 9 (the top), but its
        // record is not done: a kill landed while it finished. Rebuilt, it runs again (from its
        // checkpoint) and is neither paused nor pruned.
        let mut a = asha(3);
        let decisions = [
            a.decision(DecisionKind::Start, "t0", 0),
            a.decision(DecisionKind::Promote, "t0", 0),
            a.decision(DecisionKind::Promote, "t0", 1),
        ];
        let series = HashMap::from([(0, (1..=9).map(|e| (e, 0.5)).collect::<Vec<_>>())]);
        let (now, prune) = a.rebuild(&decisions, &series, &|_| false, &|s| s[1..].parse().ok());
        assert_eq!((now, prune), (vec![0], vec![]));
        assert_eq!(a.pause_at(0), None, "it runs to the end");
        assert!(!a.paused.contains(&0));
    }
    use xlab_plan::file::Algorithm;

    fn asha(trials: usize) -> Asha {
        let spec = Search {
            algorithm: Algorithm::Asha,
            metric: "val.acc".into(),
            mode: Mode::Max,
            reduction: 3,
            rungs: vec![1, 3, 9],
            tpe: None,
        };
        let mut a = Asha::new("e", "s", spec, (0..trials).collect());
        for t in 0..trials {
            a.ready(t);
        }
        a
    }

    fn id(t: usize) -> String {
        format!("t{t}")
    }

    /// Trial `t` logs `v` at every epoch up to `epoch`.
    fn log(a: &mut Asha, t: usize, epoch: u64, v: f64) {
        for e in 1..=epoch {
            a.saw(t, e, &BTreeMap::from([("val.acc".to_string(), v)]));
        }
    }

    /// With one slot: 9 trials start one by one; after the third pauses at rung 0 the best of
    /// the three (1/η of them) is promoted before any new trial starts, and so on; at the end
    /// the paused trials are pruned and the best reaches the top.
    #[test]
    fn one_slot_runs_successive_halving_asynchronously() {
        let mut a = asha(9);
        let quality = [0.5, 0.9, 0.7, 0.2, 0.95, 0.3, 0.6, 0.1, 0.8];
        let mut log_of = Vec::new();
        while let Some(Next::Run(t, d)) = a.next(&id) {
            log_of.push((d.kind, t, d.rung));
            let target = a.spec.rungs[*a.heading.get(&t).unwrap()];
            log(&mut a, t, target, quality[t]);
            if target == 9 {
                a.finished(t);
            } else {
                a.paused(t).unwrap();
            }
        }
        use DecisionKind::*;
        assert_eq!(
            log_of[..5],
            [(Start, 0, 0), (Start, 1, 0), (Start, 2, 0), (Promote, 1, 0), (Start, 3, 0)],
            "{log_of:?}"
        );
        let pruned = a.settle(&id);
        // Rung 1 ends with 3 trials reaching it (9/3), of which 1 goes on to the top.
        let promoted_to_top: Vec<usize> =
            log_of.iter().filter(|(k, _, r)| *k == Promote && *r == 1).map(|x| x.1).collect();
        assert_eq!(promoted_to_top, [4], "the best trial at rung 1: {log_of:?}");
        assert_eq!(pruned.len(), 8);
        assert!(pruned.iter().all(|(_, d)| d.kind == Prune && d.value.is_some() && d.rank.is_some()));
        let s = a.summary();
        assert_eq!((s.finished, s.pruned, s.epochs_full), (1, 8, 81));
        assert_eq!(s.best, Some((4, 0.95)));
        assert!(s.epochs_used < 81 * 35 / 100, "{} of 81 epochs", s.epochs_used);
    }

    /// A search rebuilt from its decisions and the trials' series after a stop goes on exactly
    /// as the uninterrupted one: the same decisions, in the same order.
    #[test]
    fn a_rebuilt_search_makes_the_same_decisions() {
        let quality = [0.5, 0.9, 0.7, 0.2, 0.95, 0.3, 0.6, 0.1, 0.8];
        let run = |stop_after: usize| -> Vec<Decision> {
            let mut a = asha(9);
            let mut decisions = Vec::new();
            let mut series: HashMap<usize, Vec<(u64, f64)>> = HashMap::new();
            let mut done: HashSet<usize> = HashSet::new();
            loop {
                let t = {
                    match a.next(&id) {
                        Some(Next::Run(t, d)) => {
                            decisions.push(d);
                            if decisions.len() == stop_after {
                                // Stopped after recording the decision, before acting on it:
                                // rebuilt, the search runs the trial it decided on.
                                let mut b = Asha::new("e", "s", a.spec.clone(), (0..9).collect());
                                let (now, prune) =
                                    b.rebuild(&decisions, &series, &|t| done.contains(&t), &|s| s[1..].parse().ok());
                                assert!(prune.is_empty());
                                assert_eq!(now, [t], "the trial decided on runs after the rebuild");
                                for t in 0..9 {
                                    if !b.has_started(t) {
                                        b.ready(t);
                                    }
                                }
                                a = b;
                            }
                            t
                        }
                        Some(Next::Propose { .. }) => unreachable!("ASHA proposes nothing"),
                        None => break,
                    }
                };
                let target = a.spec.rungs[*a.heading.get(&t).unwrap()];
                log(&mut a, t, target, quality[t]);
                series.insert(t, (1..=target).map(|e| (e, quality[t])).collect());
                if target == 9 {
                    a.finished(t);
                    done.insert(t);
                } else {
                    a.paused(t).unwrap();
                }
            }
            decisions.extend(a.settle(&id).into_iter().map(|(_, d)| d));
            decisions
        };
        let whole = run(usize::MAX);
        for stop in [1, 3, 4, 7, 10] {
            assert_eq!(run(stop), whole, "stopped after {stop} decisions");
        }
    }

    #[test]
    fn spearman_matches_scipy() {
        // scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic == 0.8207826816681233
        let pairs = [(1.0, 5.0), (2.0, 6.0), (3.0, 7.0), (4.0, 8.0), (5.0, 7.0)];
        assert!((spearman(&pairs).unwrap() - 0.820_782_681_668_123_3).abs() < 1e-12);
        assert_eq!(spearman(&[(1.0, 2.0), (1.0, 3.0), (1.0, 4.0)]), None);
    }
}

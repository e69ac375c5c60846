//! One epoch's running statistics ([`EpochStats`]): loss, accuracy, plugin values and per-group
//! sums, kept on the device until the epoch ends, and the per-example verdicts JTT reads; and
//! their restoration from a checkpoint taken inside an epoch.

use crate::checkpoint;
use crate::Failure;
use tch::{Kind, Tensor};
use xlab_proto::FailureCause;

/// Running sums of what one epoch reports. The per-example statistics of each batch stay on the
/// device until the epoch ends (`settle`), so recording them costs no host synchronization.
#[derive(Default)]
pub(crate) struct EpochStats {
    /// The host-side sums (loss, correct, examples, steps, passes, plugin values, per group);
    /// a checkpoint inside the epoch saves them as they are.
    pub(crate) totals: checkpoint::PartialEpoch,
    /// Per training example: 0 not visited, 1 right, 2 wrong at its latest visit this epoch.
    pub(crate) verdict: Vec<u8>,
    /// Batches recorded since the last `settle`, in order.
    pending: Vec<Recorded>,
    /// The running count of correct predictions, on the device.
    pub(crate) correct_on_device: Option<Tensor>,
}

/// One batch's training-pass statistics, still on the device.
struct Recorded {
    index: Tensor,
    right: Tensor,
    /// Per-example losses and group ids, when the data has groups.
    by_group: Option<(Tensor, Tensor)>,
}

impl EpochStats {
    pub(crate) fn new(n_train: usize, groups: usize) -> Self {
        let totals = checkpoint::PartialEpoch { groups: vec![(0.0, 0.0, 0.0); groups], ..Default::default() };
        EpochStats { totals, verdict: vec![0; n_train], ..Default::default() }
    }

    /// Records the training-pass predictions of one batch (before its update): `correct` is the
    /// per-row credit (fractional for soft targets), `pred == labels` decides each example's
    /// verdict.
    pub(crate) fn record(
        &mut self,
        per_example: &Tensor,
        pred: &Tensor,
        labels: &Tensor,
        index: &Tensor,
        correct: &Tensor,
        group: Option<&Tensor>,
    ) {
        let batch_correct = correct.sum(Kind::Double);
        self.correct_on_device = Some(match self.correct_on_device.take() {
            Some(c) => c + batch_correct,
            None => batch_correct,
        });
        self.pending.push(Recorded {
            index: index.shallow_clone(),
            right: pred.eq_tensor(labels),
            by_group: group.map(|g| (per_example.detach().to_kind(Kind::Double), g.shallow_clone())),
        });
    }

    /// Brings the recorded batches to the host, in the order they were recorded.
    pub(crate) fn settle(&mut self) -> Result<(), tch::TchError> {
        if let Some(c) = self.correct_on_device.take() {
            self.totals.correct += f64::try_from(c)?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let cat = |f: &dyn Fn(&Recorded) -> Tensor| Tensor::cat(&pending.iter().map(f).collect::<Vec<_>>(), 0);
        let idx = Vec::<i64>::try_from(cat(&|r| r.index.shallow_clone()))?;
        let right = Vec::<bool>::try_from(cat(&|r| r.right.shallow_clone()))?;
        for (i, ok) in idx.iter().zip(&right) {
            self.verdict[*i as usize] = if *ok { 1 } else { 2 };
        }
        if pending.iter().all(|r| r.by_group.is_some()) {
            let pair = |r: &Recorded| r.by_group.as_ref().map(|(l, g)| (l.shallow_clone(), g.shallow_clone()));
            let losses = Vec::<f64>::try_from(cat(&|r| pair(r).expect("checked").0))?;
            let groups = Vec::<i64>::try_from(cat(&|r| pair(r).expect("checked").1))?;
            for ((g, l), ok) in groups.into_iter().zip(losses).zip(right) {
                if let Some(e) = self.totals.groups.get_mut(g as usize) {
                    e.0 += l;
                    e.1 += f64::from(u8::from(ok));
                    e.2 += 1.0;
                }
            }
        }
        Ok(())
    }

    /// A value a plugin logged; the epoch reports the mean of each name's values.
    pub(crate) fn log(&mut self, name: &str, value: f64) {
        let e = self.totals.plugin.entry(name.to_string()).or_default();
        e.0 += value;
        e.1 += 1;
    }

    /// Recall of each class over the examples visited this epoch, judged at their latest visit.
    pub(crate) fn class_recall(&self, labels: &[i64], classes: usize) -> Vec<Option<f64>> {
        let mut hit = vec![(0u64, 0u64); classes];
        for (v, y) in self.verdict.iter().zip(labels) {
            if let (1 | 2, Some(h)) = (v, hit.get_mut(*y as usize)) {
                h.0 += u64::from(*v == 1);
                h.1 += 1;
            }
        }
        hit.iter().map(|(r, n)| (*n > 0).then(|| *r as f64 / *n as f64)).collect()
    }

    /// The examples misclassified at their latest visit.
    pub(crate) fn errors(&self) -> Vec<u64> {
        self.verdict.iter().enumerate().filter(|(_, v)| **v == 2).map(|(i, _)| i as u64).collect()
    }
}

/// The epoch in progress at a checkpoint taken inside it: batches done, order, statistics.
pub(crate) fn inside_epoch(
    c: &checkpoint::Checkpoint,
    n: usize,
    groups: usize,
) -> Result<(u64, Vec<i64>, EpochStats), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("checkpoint in epoch {}: {m}", c.meta.epoch + 1));
    let tensor = |name: &str| {
        c.tensors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| bad(format!("no `{name}`")))
    };
    let order = Vec::<i64>::try_from(tensor("state.order")?).map_err(|e| bad(e.to_string()))?;
    let verdict = Vec::<u8>::try_from(tensor("state.verdict")?).map_err(|e| bad(e.to_string()))?;
    let p = c.meta.partial.clone().ok_or_else(|| bad("no epoch statistics".into()))?;
    if verdict.len() != n || p.groups.len() != groups {
        return Err(bad(format!("it was taken with {} training examples, the data has {n}", verdict.len())));
    }
    let stats = EpochStats { totals: p, verdict, ..Default::default() };
    Ok((c.meta.step_in_epoch, order, stats))
}

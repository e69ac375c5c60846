//! The device pool: the slots jobs run in, each with its device and thread count.

/// One place a job can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// `cpu`, or `cuda:N` (the physical GPU index, exported to the worker as
    /// `CUDA_VISIBLE_DEVICES=N`, where it becomes `cuda:0`).
    pub device: String,
    pub threads: usize,
}

/// A fixed set of slots; jobs take a free one and give it back when they end.
#[derive(Debug)]
pub struct Pool {
    slots: Vec<Slot>,
    busy: Vec<bool>,
}

impl Pool {
    /// `n` CPU slots of `threads` threads each.
    pub fn cpu(n: usize, threads: usize) -> Self {
        let slots = vec![Slot { device: "cpu".into(), threads: threads.max(1) }; n.max(1)];
        Self::new(slots)
    }

    pub fn new(slots: Vec<Slot>) -> Self {
        let busy = vec![false; slots.len()];
        Self { slots, busy }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn free(&self) -> usize {
        self.busy.iter().filter(|b| !**b).count()
    }

    /// Takes a free slot, returning its index.
    pub fn take(&mut self) -> Option<usize> {
        let i = self.busy.iter().position(|b| !*b)?;
        self.busy[i] = true;
        Some(i)
    }

    pub fn give_back(&mut self, i: usize) {
        assert!(self.busy[i], "slot {i} given back twice");
        self.busy[i] = false;
    }

    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }
}

/// Default CPU slots for a machine: one single-threaded slot per core.
pub fn default_cpu_slots() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_and_given_back() {
        let mut p = Pool::cpu(2, 1);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.take(), None);
        p.give_back(a);
        assert_eq!(p.free(), 1);
        assert_eq!(p.take(), Some(a));
    }
}

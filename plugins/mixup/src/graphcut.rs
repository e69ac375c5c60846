//! Multi-label energy minimization on a 4-connected grid by α-β swap moves, as gco-v3.0
//! (Boykov, Veksler & Zabih, PAMI 2001; Delong et al.) runs it behind gco-wrapper's
//! `cut_grid_graph(unary, pairwise, cost_v, cost_h, algorithm="swap")`, which Co-Mixup calls.
//!
//! The energy is integer, as gco's: E(l) = Σ_s D(s, l_s) + Σ_{s~t} w · V(l_s, l_t), with the
//! float costs the caller has converted the way gco-wrapper does (see [`unary_int`],
//! [`weight_int`], [`smooth_int`]). Every site starts at label 0. A cycle visits the label pairs
//! (a, b), a < b, in gco's order: a = 0, 1, …; for each a, b from the last label down. A swap
//! move re-labels the sites now at a or b with a minimum cut; gco takes the cut whose sink side
//! (the sites that become b) is the set of sites that can still reach the sink once the flow is
//! maximal, which is the smallest sink side among all minimum cuts and so the same whatever
//! max-flow algorithm finds it. Cycles repeat while a cycle lowers the energy.

/// gco-wrapper's float-to-integer conversion of a unary cost (`_UNARY_FLOAT_PRECISION`):
/// truncation toward zero of cost × 10⁵.
pub fn unary_int(c: f64) -> i64 {
    (c * 100_000.0) as i32 as i64
}

/// gco-wrapper's conversion of an edge weight: the weight as float32, × 1000 in float32,
/// truncated (`_PAIRWISE_FLOAT_PRECISION`).
pub fn weight_int(w: f64) -> i64 {
    ((w as f32) * 1000.0f32) as i32 as i64
}

/// gco-wrapper's conversion of a label-pair cost: float32 × 100, truncated
/// (`_SMOOTH_COST_PRECISION`).
pub fn smooth_int(v: f32) -> i64 {
    (v * 100.0f32) as i32 as i64
}

/// A grid energy: `data[site · labels + label]` with sites row-major (site = row · width +
/// column), `smooth[a · labels + b]` symmetric with a zero diagonal, and one weight for every
/// vertical and horizontal edge.
pub struct Grid {
    pub height: usize,
    pub width: usize,
    pub labels: usize,
    pub data: Vec<i64>,
    pub smooth: Vec<i64>,
    pub weight: i64,
}

impl Grid {
    /// The neighbours of a site, each edge once from its lower-numbered end.
    fn edges(&self) -> Vec<(usize, usize)> {
        let (h, w) = (self.height, self.width);
        let mut e = Vec::with_capacity(2 * h * w);
        for r in 0..h {
            for c in 0..w {
                let s = r * w + c;
                if r + 1 < h {
                    e.push((s, s + w));
                }
                if c + 1 < w {
                    e.push((s, s + 1));
                }
            }
        }
        e
    }

    pub fn energy(&self, lab: &[usize]) -> i64 {
        let n = self.labels;
        let data: i64 = lab.iter().enumerate().map(|(s, &l)| self.data[s * n + l]).sum();
        let smooth: i64 = self.edges().iter().map(|&(s, t)| self.weight * self.smooth[lab[s] * n + lab[t]]).sum();
        data + smooth
    }

    /// gco's `swap(-1)` from the all-zero labeling: the labels of the sites.
    pub fn swap(&self) -> Vec<usize> {
        let n = self.labels;
        let sites = self.height * self.width;
        let mut nbrs = vec![Vec::new(); sites];
        for (s, t) in self.edges() {
            nbrs[s].push(t);
            nbrs[t].push(s);
        }
        let mut lab = vec![0usize; sites];
        let mut count = vec![0usize; n];
        count[0] = sites;
        let mut work = Work { flow: Flow::default(), active: Vec::new(), var: vec![usize::MAX; sites], count };
        let mut new = self.energy(&lab);
        let mut old = new + 1;
        while old > new {
            old = new;
            for a in 0..n {
                for b in (a + 1..n).rev() {
                    self.swap_move(&mut lab, &nbrs, a, b, &mut work);
                }
            }
            new = self.energy(&lab);
        }
        lab
    }

    /// One α-β swap: the sites at `a` or `b` take whichever of the two the minimum cut gives.
    fn swap_move(&self, lab: &mut [usize], nbrs: &[Vec<usize>], a: usize, b: usize, w: &mut Work) {
        let n = self.labels;
        if w.count[a] + w.count[b] == 0 {
            return;
        }
        w.active.clear();
        w.active.extend((0..lab.len()).filter(|&s| lab[s] == a || lab[s] == b));
        if w.active.is_empty() {
            return;
        }
        for (i, &s) in w.active.iter().enumerate() {
            w.var[s] = i;
        }
        // Binary variable i: 0 keeps site active[i] at a (source side), 1 puts it at b (sink
        // side). E_i(0) is paid on the edge i→t, E_i(1) on s→i; the pair cost w·V(a, b) on i→j
        // (i at a, j at b) and on j→i.
        let (src, snk) = (w.active.len(), w.active.len() + 1);
        w.flow.reset(w.active.len() + 2);
        for (i, &s) in w.active.iter().enumerate() {
            let (mut e0, mut e1) = (self.data[s * n + a], self.data[s * n + b]);
            for &t in &nbrs[s] {
                if w.var[t] == usize::MAX {
                    e0 += self.weight * self.smooth[a * n + lab[t]];
                    e1 += self.weight * self.smooth[b * n + lab[t]];
                } else if w.var[t] > i {
                    let (j, c) = (w.var[t], self.weight * self.smooth[a * n + b]);
                    w.flow.add(i, j, c, c);
                }
            }
            let m = e0.min(e1);
            w.flow.add(src, i, e1 - m, 0);
            w.flow.add(i, snk, e0 - m, 0);
        }
        w.flow.max_flow(src, snk);
        let at_b = w.flow.reaches(snk);
        for (i, &s) in w.active.iter().enumerate() {
            lab[s] = if at_b[i] { b } else { a };
            w.var[s] = usize::MAX;
        }
        let at = w.active.iter().filter(|&&s| lab[s] == b).count();
        w.count[b] = at;
        w.count[a] = w.active.len() - at;
    }
}

/// Buffers one `swap` reuses across its moves.
struct Work {
    flow: Flow,
    active: Vec<usize>,
    /// The binary variable of each site in the current move (`usize::MAX`: not in it).
    var: Vec<usize>,
    /// Sites at each label, so moves between two absent labels cost nothing.
    count: Vec<usize>,
}

const NONE: usize = usize::MAX;

/// A small max-flow network (Dinic's algorithm) with integer capacities, its edges in linked
/// lists over flat arrays so a move allocates nothing once the buffers have grown.
#[derive(Default)]
struct Flow {
    /// First edge out of each node, and each edge's next one out of the same node.
    first: Vec<usize>,
    next: Vec<usize>,
    to: Vec<usize>,
    cap: Vec<i64>,
    level: Vec<usize>,
    cursor: Vec<usize>,
    queue: Vec<usize>,
    seen: Vec<bool>,
}

impl Flow {
    fn reset(&mut self, n: usize) {
        self.first.clear();
        self.first.resize(n, NONE);
        self.next.clear();
        self.to.clear();
        self.cap.clear();
    }

    /// An edge u→v with capacity `c` and its reverse v→u with capacity `rc`.
    fn add(&mut self, u: usize, v: usize, c: i64, rc: i64) {
        for (from, to, cap) in [(u, v, c), (v, u, rc)] {
            self.next.push(self.first[from]);
            self.first[from] = self.to.len();
            self.to.push(to);
            self.cap.push(cap);
        }
    }

    fn max_flow(&mut self, s: usize, t: usize) {
        let n = self.first.len();
        loop {
            self.level.clear();
            self.level.resize(n, NONE);
            self.level[s] = 0;
            self.queue.clear();
            self.queue.push(s);
            let mut head = 0;
            while head < self.queue.len() {
                let u = self.queue[head];
                head += 1;
                let mut e = self.first[u];
                while e != NONE {
                    let v = self.to[e];
                    if self.cap[e] > 0 && self.level[v] == NONE {
                        self.level[v] = self.level[u] + 1;
                        self.queue.push(v);
                    }
                    e = self.next[e];
                }
            }
            if self.level[t] == NONE {
                return;
            }
            self.cursor.clear();
            self.cursor.extend_from_slice(&self.first);
            while self.augment(s, t, i64::MAX) > 0 {}
        }
    }

    fn augment(&mut self, u: usize, t: usize, limit: i64) -> i64 {
        if u == t {
            return limit;
        }
        while self.cursor[u] != NONE {
            let e = self.cursor[u];
            let v = self.to[e];
            if self.cap[e] > 0 && self.level[v] == self.level[u] + 1 {
                let pushed = self.augment(v, t, limit.min(self.cap[e]));
                if pushed > 0 {
                    self.cap[e] -= pushed;
                    self.cap[e ^ 1] += pushed;
                    return pushed;
                }
            }
            self.cursor[u] = self.next[e];
        }
        0
    }

    /// Which nodes can still reach `t` through edges with capacity left.
    fn reaches(&mut self, t: usize) -> &[bool] {
        self.seen.clear();
        self.seen.resize(self.first.len(), false);
        self.seen[t] = true;
        self.queue.clear();
        self.queue.push(t);
        while let Some(v) = self.queue.pop() {
            // An edge u→v with capacity left is the reverse of an edge v→u, numbered e ^ 1.
            let mut e = self.first[v];
            while e != NONE {
                let u = self.to[e];
                if !self.seen[u] && self.cap[e ^ 1] > 0 {
                    self.seen[u] = true;
                    self.queue.push(u);
                }
                e = self.next[e];
            }
        }
        &self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every labeling of a small grid, by brute force.
    fn brute_min(g: &Grid) -> i64 {
        let sites = g.height * g.width;
        let mut best = i64::MAX;
        let mut lab = vec![0usize; sites];
        loop {
            best = best.min(g.energy(&lab));
            let mut k = 0;
            while k < sites {
                lab[k] += 1;
                if lab[k] < g.labels {
                    break;
                }
                lab[k] = 0;
                k += 1;
            }
            if k == sites {
                return best;
            }
        }
    }

    #[test]
    fn two_labels_reach_the_global_minimum() {
        // With two labels one swap move is an exact minimization.
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as i64 % 1000
        };
        for _ in 0..20 {
            let data = (0..9 * 2).map(|_| next()).collect();
            let g = Grid { height: 3, width: 3, labels: 2, data, smooth: vec![0, 100, 100, 0], weight: 3 };
            let lab = g.swap();
            assert_eq!(g.energy(&lab), brute_min(&g));
        }
    }

    #[test]
    fn ties_go_to_the_first_label() {
        // Every labeling costs the same: the smallest sink side is empty, so all sites stay at 0.
        let g = Grid { height: 2, width: 2, labels: 3, data: vec![5; 12], smooth: vec![0; 9], weight: 1 };
        assert_eq!(g.swap(), vec![0; 4]);
    }

    #[test]
    fn conversions_truncate_as_gco_wrapper_does() {
        assert_eq!(unary_int(-0.0625), -6250);
        assert_eq!(unary_int(1.234_567_89e-3), 123);
        assert_eq!(weight_int(0.02), 20);
        assert_eq!(smooth_int(0.25), 25);
    }
}

//! Job identity as properties of whole experiment files: writing the same experiment another
//! way (key order, block or flow style, number spelling, a value moved between `defaults` and the
//! stage) never changes an id; changing any value does.

use std::path::Path;
use xlab_proto::plugins::Registry;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random experiment's values.
#[derive(Clone)]
struct Exp {
    lr: f64,
    momentum: f64,
    epochs: u32,
    hidden: Vec<u32>,
    noise: f64,
    seeds: u32,
}

/// Writes `e` in the style chosen by `r`.
fn write(e: &Exp, r: &mut Rng) -> String {
    let num = |x: f64, r: &mut Rng| match r.below(3) {
        0 => format!("{x:?}"),
        1 => format!("{x:e}"),
        _ => format!("{:.12}", x),
    };
    let mut opt =
        [String::from("name: sgd"), format!("lr: {}", num(e.lr, r)), format!("momentum: {}", num(e.momentum, r))];
    if r.below(2) == 0 {
        opt.reverse();
    }
    let optimizer = if r.below(2) == 0 {
        format!("  optimizer: {{{}}}\n", opt.join(", "))
    } else {
        format!("  optimizer:\n{}", opt.iter().map(|l| format!("    {l}\n")).collect::<String>())
    };
    let hidden: Vec<String> =
        e.hidden.iter().map(|h| if r.below(2) == 0 { format!("{h}") } else { format!("{h}.0") }).collect();
    let mut defaults = vec![
        "  task: train\n".to_string(),
        format!("  data: {{noise: {}, name: two_moons}}\n", num(e.noise, r)),
        format!("  model: {{hidden: [{}], name: mlp}}\n", hidden.join(", ")),
        optimizer,
    ];
    let epochs =
        format!("epochs: {}", if r.below(2) == 0 { format!("{}", e.epochs) } else { format!("{}.0", e.epochs) });
    // `epochs` in the defaults or in the stage: the merged config is the same.
    let in_stage = r.below(2) == 0;
    if !in_stage {
        defaults.push(format!("  {epochs}\n"));
    }
    for i in (1..defaults.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        defaults.swap(i, j);
    }
    let stage =
        if in_stage { format!("    {epochs}\n    seeds: {}\n", e.seeds) } else { format!("    seeds: {}\n", e.seeds) };
    if r.below(2) == 0 {
        format!("name: p\ndefaults:\n{}stages:\n  a:\n{stage}", defaults.concat())
    } else {
        format!("stages:\n  a:\n{stage}defaults:\n{}name: p\n", defaults.concat())
    }
}

fn ids(text: &str) -> Vec<String> {
    let plan = xlab_plan::load_str(Path::new("p.yaml"), text, &mut Registry::default())
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    plan.jobs().map(|j| j.id.as_str().to_string()).collect()
}

#[test]
fn rewriting_a_file_keeps_every_id_and_changing_a_value_changes_them() {
    let mut r = Rng(0x9E3779B97F4A7C15);
    for _ in 0..200 {
        let e = Exp {
            lr: (1 + r.below(1000)) as f64 / 1024.0,
            momentum: r.below(10) as f64 / 16.0,
            epochs: 1 + r.below(20) as u32,
            hidden: (0..1 + r.below(3)).map(|_| 1 + r.below(64) as u32).collect(),
            noise: r.below(50) as f64 / 100.0,
            seeds: 1 + r.below(3) as u32,
        };
        let (a, b) = (write(&e, &mut r), write(&e, &mut r));
        let base = ids(&a);
        assert_eq!(base.len(), e.seeds as usize);
        assert_eq!(base, ids(&b), "same experiment, two spellings:\n{a}\n---\n{b}");
        let mut changed = e.clone();
        match r.below(5) {
            0 => changed.lr *= 1.5,
            1 => changed.momentum += if e.momentum < 0.5 { 0.25 } else { -0.25 },
            2 => changed.epochs += 1,
            3 => changed.hidden.push(3),
            _ => changed.noise += 0.01,
        }
        let c = write(&changed, &mut r);
        for (x, y) in base.iter().zip(ids(&c)) {
            assert_ne!(*x, y, "a changed value keeps the id:\n{a}\n---\n{c}");
        }
    }
}

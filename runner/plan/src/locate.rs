//! Where each key of an experiment file is written. Most mistakes are found after the file is
//! merged (defaults into stages, includes under the file, sweep points into configs), where the
//! YAML parser's positions are gone; the error then names the key path, and this module finds
//! that path's line and column in the file, or in the included file that wrote it.

use crate::SpecError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, Parser};

/// The 1-based line and column of every key (and of every list item, by index) of a YAML text.
#[derive(Debug, Default)]
pub struct Positions {
    at: HashMap<Vec<String>, (usize, usize)>,
}

enum Frame {
    /// A map; `key` is the key whose value comes next (none: a key comes next).
    Map {
        key: Option<String>,
    },
    Seq {
        index: usize,
    },
}

impl Positions {
    /// Reads the positions of `source`; a text the parser rejects gives the positions it got to.
    pub fn of(source: &str) -> Positions {
        let mut at = HashMap::new();
        let mut path: Vec<String> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(source);
        while let Ok((event, mark)) = parser.next_token() {
            let here = (mark.line(), mark.col() + 1);
            // The frame a collection opens.
            let opened = match event {
                Event::MappingStart(..) => Some(Frame::Map { key: None }),
                Event::SequenceStart(..) => Some(Frame::Seq { index: 0 }),
                _ => None,
            };
            match event {
                Event::StreamEnd => break,
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    if !stack.is_empty() {
                        path.pop();
                    }
                    value_done(&mut stack);
                }
                Event::Scalar(..) | Event::Alias(..) | Event::MappingStart(..) | Event::SequenceStart(..) => {
                    // What this node is to its parent: a key (recorded, then the map waits for
                    // its value), a value under a key, or a list item (recorded by index).
                    let segment = match stack.last_mut() {
                        None => None,
                        Some(Frame::Map { key: k @ None }) => {
                            let key = match &event {
                                Event::Scalar(s, ..) => s.clone(),
                                _ => "?".to_string(),
                            };
                            *k = Some(key.clone());
                            path.push(key);
                            at.entry(path.clone()).or_insert(here);
                            path.pop();
                            if let Some(frame) = opened {
                                // A complex key: its contents are skipped under the name "?".
                                path.push("?".to_string());
                                stack.push(frame);
                            }
                            continue;
                        }
                        Some(Frame::Map { key: Some(k) }) => Some(k.clone()),
                        Some(Frame::Seq { index }) => {
                            path.push(index.to_string());
                            at.entry(path.clone()).or_insert(here);
                            path.pop()
                        }
                    };
                    match opened {
                        Some(frame) => {
                            path.extend(segment);
                            stack.push(frame);
                        }
                        None => value_done(&mut stack),
                    }
                }
                _ => {}
            }
        }
        Positions { at }
    }

    /// The position of a key path, e.g. `["stages", "train", "optimizer", "lr"]`.
    pub fn get(&self, path: &[String]) -> Option<(usize, usize)> {
        self.at.get(path).copied()
    }

    /// How many leading segments of `path` are written here.
    fn prefix_len(&self, path: &[String]) -> usize {
        (1..=path.len()).rev().find(|n| self.at.contains_key(&path[..*n])).unwrap_or(0)
    }
}

/// After a value (a scalar, or a collection that ended): a map now expects a key, a list its
/// next item.
fn value_done(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { key }) => *key = None,
        Some(Frame::Seq { index }) => *index += 1,
        None => {}
    }
}

/// The files an experiment is written in, in the order a value is looked up: the file itself,
/// then its includes from the last to the first (a later file overrides an earlier one).
fn written_in(file: &Path, source: &str, out: &mut Vec<(PathBuf, Positions)>, depth: usize) {
    out.push((file.to_path_buf(), Positions::of(source)));
    if depth > 16 {
        return;
    }
    let includes =
        serde_yaml::from_str(source).ok().and_then(|doc| crate::file::include_list(&doc).ok()).unwrap_or_default();
    let base = file.parent().unwrap_or(Path::new("."));
    for inc in includes.iter().rev() {
        let p = base.join(inc);
        if let Ok(text) = std::fs::read_to_string(&p) {
            written_in(&p, &text, out, depth + 1);
        }
    }
}

/// Gives an error without a position the line and column of the key it is about: the first of
/// its candidate key paths written exactly in the file or its includes, else the longest part of
/// one that is written (the stage, say, for a key the stage lacks).
/// A key whose line comes right after a key with nothing under it, at the same indentation or
/// less (`grid:` then `optimizer.lr: [...]` under-indented), is most likely meant to be under
/// it: a hint says so, instead of what the misplaced key makes of the file ("expected struct
/// StageFile", or an unknown field with a did-you-mean that cannot help).
pub fn indentation_hint(mut err: SpecError, file: &Path, source: &str) -> SpecError {
    let Some((line, _)) = err.location else { return err };
    // A hint that knows better (a tab, say) stays; a did-you-mean cannot help here.
    if &*err.file != file || line < 2 || err.hint.as_ref().is_some_and(|h| !h.starts_with("did you mean")) {
        return err;
    }
    let lines: Vec<&str> = source.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let code = |l: &str| l.split(" #").next().unwrap_or("").trim_end().to_string();
    let Some(here) = lines.get(line as usize - 1) else { return err };
    if here.trim().is_empty() {
        return err;
    }
    let Some((at, before)) = lines[..line as usize - 1]
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    else {
        return err;
    };
    let prev = code(before);
    let bare_key = prev.ends_with(':') && !prev.trim_start().starts_with('-') && !prev.contains(": ");
    if bare_key && indent(here) <= indent(before) {
        let key = prev.trim().trim_end_matches(':');
        err.hint = Some(format!(
            "`{key}:` on line {} has nothing under it; if line {line} belongs to it, indent it further than `{key}` (YAML nests by indentation)",
            at + 1
        ));
    }
    err
}

pub fn fill(mut err: SpecError, file: &Path, source: &str) -> SpecError {
    if err.location.is_some() {
        return err;
    }
    let candidates = err.key_paths();
    if candidates.is_empty() {
        return err;
    }
    let mut files = Vec::new();
    written_in(file, source, &mut files, 0);
    for c in &candidates {
        for (f, pos) in &files {
            if let Some((l, col)) = pos.get(c) {
                if f.as_path() != file {
                    err.file = f.as_path().into();
                }
                return err.at(l, col);
            }
        }
    }
    let mut best: Option<(usize, &PathBuf, Vec<String>)> = None;
    for c in &candidates {
        for (f, pos) in &files {
            let n = pos.prefix_len(c);
            if n > 0 && best.as_ref().is_none_or(|(m, ..)| n > *m) {
                best = Some((n, f, c[..n].to_vec()));
            }
        }
    }
    match best {
        Some((_, f, path)) => {
            let (l, col) = files.iter().find(|(g, _)| g == f).and_then(|(_, p)| p.get(&path)).expect("found above");
            if f.as_path() != file {
                err.file = f.as_path().into();
            }
            err.at(l, col)
        }
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('/').map(str::to_string).collect()
    }

    #[test]
    fn finds_keys_and_items_in_block_and_flow_style() {
        let text = "name: x\nstages:\n  train:\n    optimizer: {name: sgd, lr: 0.1}\n    grid:\n      optimizer.lr: [1, 2]\n    hidden:\n      - 3\n      - {a: 1}\n";
        let pos = Positions::of(text);
        assert_eq!(pos.get(&p("name")), Some((1, 1)));
        assert_eq!(pos.get(&p("stages/train")), Some((3, 3)));
        assert_eq!(pos.get(&p("stages/train/optimizer/lr")), Some((4, 28)));
        assert_eq!(pos.get(&p("stages/train/grid/optimizer.lr")), Some((6, 7)));
        assert_eq!(pos.get(&p("stages/train/grid/optimizer.lr/1")), Some((6, 25)));
        assert_eq!(pos.get(&p("stages/train/hidden/1/a")), Some((9, 10)));
        assert_eq!(pos.get(&p("stages/train/epochs")), None);
        assert_eq!(pos.prefix_len(&p("stages/train/epochs")), 2);
    }

    #[test]
    fn a_broken_text_gives_the_positions_before_the_break() {
        let pos = Positions::of("a: 1\nb: [\n");
        assert_eq!(pos.get(&p("a")), Some((1, 1)));
    }
}

//! Errors a user can make in an experiment file. Each names the file, and the line and column
//! where the parser knows them, and suggests a fix where one is likely.

use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: Box<Path>,
    /// 1-based line and column, when known.
    pub location: Option<(u32, u32)>,
    /// Where in the experiment the problem is, e.g. `stages.train (optimizer.lr=0.1, seed 0)`.
    pub context: Option<String>,
    pub message: String,
    pub hint: Option<String>,
    /// Key segments below the context that the error is about (a parameter name, say), used to
    /// find its line and column; not shown.
    pub keys: Box<[String]>,
}

impl SpecError {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        let message = message.into();
        let hint = suggest_from_serde_message(&message);
        // serde's "unknown field `x`": the error is about `x`, below its context.
        let keys = match unknown_name(&message) {
            Some(("field", word, _)) => Box::new([word.to_string()]) as Box<[String]>,
            _ => Box::default(),
        };
        Self { file: file.into(), location: None, context: None, message, hint, keys }
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        self.location = Some((clamp(line), clamp(column)));
        self
    }

    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Names the key below the context the error is about, as it is written in the file (one
    /// segment: `optimizer.lr` under `grid:` is one key).
    /// Puts the keys found so far under `parents` (an error about a field of a map that was
    /// read on its own: `executor.slurm` above `gpu_per_job`).
    pub fn under(mut self, parents: &[&str]) -> Self {
        let keys: Vec<String> =
            parents.iter().map(|p| p.to_string()).chain(std::mem::take(&mut self.keys).into_vec()).collect();
        self.keys = keys.into();
        self
    }

    pub fn key(mut self, segment: impl Into<String>) -> Self {
        let mut keys = std::mem::take(&mut self.keys).into_vec();
        keys.push(segment.into());
        self.keys = keys.into();
        self
    }

    /// The key paths of the file where the mistake may be written, most likely first. The
    /// context reads `stages.<stage>[ [sweep point]][: <config path>]`; a config path may be
    /// written in the stage, in a sweep of the stage, or in `defaults`.
    pub(crate) fn key_paths(&self) -> Vec<Vec<String>> {
        let ctx = self.context.as_deref().unwrap_or("");
        let (head, tail) = match ctx.split_once(": ") {
            Some((h, t)) => (h, t),
            None => (ctx, ""),
        };
        let (head, point) = match head.split_once(" [") {
            Some((h, p)) => (h, p.trim_end_matches(']')),
            None => (head, ""),
        };
        let head = segments(head);
        let mut tail = segments(tail);
        tail.extend(self.keys.iter().cloned());
        let mut out = vec![head.iter().chain(&tail).cloned().collect::<Vec<_>>()];
        if head.len() == 2 && head[0] == "stages" && !tail.is_empty() {
            // A swept key: `stages.a [optimizer.lr=0.1]: optimizer.lr` is written under the
            // stage's grid, zip or random.
            let dotted = tail.join(".");
            for (key, _) in point.split(", ").filter_map(|kv| kv.split_once('=')) {
                if dotted == key || dotted.starts_with(&format!("{key}.")) || key.starts_with(&format!("{dotted}.")) {
                    for sweep in ["grid", "zip", "random"] {
                        out.push(vec![head[0].clone(), head[1].clone(), sweep.to_string(), key.to_string()]);
                    }
                }
            }
            out.push(std::iter::once("defaults".to_string()).chain(tail.iter().cloned()).collect());
        }
        out.retain(|p| !p.is_empty());
        out
    }

    /// Converts a YAML parse or shape error, keeping its position.
    pub(crate) fn from_yaml(file: &Path, err: &serde_yaml::Error) -> Self {
        let mut message = err.to_string();
        // serde_yaml appends " at line L column C"; the location is shown in front instead.
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        let e = Self::new(file, message);
        match err.location() {
            Some(loc) => e.at(loc.line(), loc.column()),
            None => e,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.location {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": ")?;
        if let Some(ctx) = &self.context {
            write!(f, "{ctx}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// `stages.a.variants[0].grid` → `stages`, `a`, `variants`, `0`, `grid`.
fn segments(dotted: &str) -> Vec<String> {
    dotted
        .split(['.', '['])
        .map(|s| s.trim_end_matches(']').trim())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant `x` …"), anywhere
/// in a message: "field" or "variant", the word, and what follows it.
fn unknown_name(message: &str) -> Option<(&'static str, &str, &str)> {
    let (kind, rest) = ["field", "variant"]
        .into_iter()
        .find_map(|k| message.split_once(&format!("unknown {k} `")).map(|(_, rest)| (k, rest)))?;
    let (word, rest) = rest.split_once('`')?;
    Some((kind, word, rest))
}

/// serde reports "unknown field `x`, expected one of `a`, `b`" (or "unknown variant"); turn that
/// into a "did you mean" hint, or a list of what is allowed.
fn suggest_from_serde_message(message: &str) -> Option<String> {
    let (_, word, rest) = unknown_name(message)?;
    let candidates: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    if candidates.is_empty() {
        return None;
    }
    // Without a close match the message itself already lists what is expected.
    did_you_mean(word, candidates.iter().copied()).map(|c| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_known_field() {
        let h = suggest_from_serde_message("unknown field `lrr`, expected one of `lr`, `momentum`, `nesterov`");
        assert_eq!(h.as_deref(), Some("did you mean `lr`?"));
        let h = suggest_from_serde_message("unknown variant `xyz`, expected `sgd` or `adam`");
        assert_eq!(h, None);
        let h = suggest_from_serde_message("unknown variant `adamm`, expected `sgd` or `adam`");
        assert_eq!(h.as_deref(), Some("did you mean `adam`?"));
        assert_eq!(suggest_from_serde_message("invalid type: string"), None);
    }

    #[test]
    fn display_names_file_position_and_hint() {
        let e = SpecError::new(Path::new("exp.yaml"), "unknown field `epocs`, expected `epochs`")
            .at(4, 3)
            .context("stages.train");
        assert_eq!(
            e.to_string(),
            "exp.yaml:4:3: stages.train: unknown field `epocs`, expected `epochs`\n  hint: did you mean `epochs`?"
        );
    }
}

//! `xlab plugins list` and `xlab plugins describe ID`: the plugins the worker finds, and one
//! component's parameters.

use crate::common::*;
use crate::plugins;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Every plugin found (id, components, version, file, sha256), and files refused with why.
    List {
        /// Print the registry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One component's parameters with types, defaults and docs, and the paper it implements.
    Describe { id: String },
}

pub fn run(cmd: &PluginsCommand) -> Result<u8, Failure> {
    let registry = plugins::WorkerPlugins::fetch(&worker_path(), &[])
        .map_err(|m| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(m) })?;
    match cmd {
        PluginsCommand::List { json } => {
            if *json {
                outln!("{}", serde_json::to_string_pretty(&registry).expect("json"));
                return Ok(0);
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
            t.set_header(["component", "kind", "plugin", "version", "file", "sha256"]);
            for p in &registry.plugins {
                for c in &p.components {
                    t.add_row([
                        c.id.as_str(),
                        c.kind.as_str(),
                        p.id.as_str(),
                        p.version.as_str(),
                        p.file.as_str(),
                        &p.sha256[..12],
                    ]);
                }
            }
            outln!("{t}");
            for r in &registry.refused {
                outln!("refused {}: {}", r.file, r.reason);
            }
            Ok(0)
        }
        PluginsCommand::Describe { id } => {
            let Some((plugin, c)) = registry.component(id) else {
                let hint = match xlab_spec::did_you_mean(id, registry.component_ids()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "see `xlab plugins list`".to_string(),
                };
                return Err(Failure {
                    code: exit::USER,
                    error: anyhow::anyhow!("unknown plugin component `{id}`\n  hint: {hint}"),
                });
            };
            outln!("{} ({}) from plugin `{}` {} ({})", c.id, c.kind, plugin.id, plugin.version, plugin.file);
            outln!("  {}", c.summary);
            outln!("  reference: {}", c.reference);
            outln!("  passes per step: {}; stateful: {}; random: {}", c.passes_per_step, c.stateful, c.random);
            outln!("parameters:");
            for p in &c.params {
                let range = match (p.min, p.max) {
                    (Some(a), Some(b)) => format!(" in [{a}, {b}]"),
                    (Some(a), None) => format!(" ≥ {a}"),
                    (None, Some(b)) => format!(" ≤ {b}"),
                    (None, None) => String::new(),
                };
                let choices =
                    if p.choices.is_empty() { String::new() } else { format!(" one of {}", p.choices.join("|")) };
                outln!("  {:<14} {:?}{range}{choices}, default {}: {}", p.name, p.ty, p.default, p.doc);
            }
            Ok(0)
        }
    }
}

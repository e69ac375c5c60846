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
                let hint = match xlab_plan::did_you_mean(id, registry.component_ids()) {
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
            if let Some((section, title)) = methods_section(&c.id) {
                outln!("  specification: docs/methods.md §{section} ({title})");
            }
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

/// The section of `docs/methods.md` that specifies a built-in component (its update rule,
/// defaults, reference, deviations and the test vectors that pin it), and its title.
fn methods_section(id: &str) -> Option<(&'static str, &'static str)> {
    Some(match id {
        "sam.sam" => ("1.1", "SAM"),
        "sam.asam" => ("1.2", "ASAM"),
        "sam.gam" => ("1.4", "GAM"),
        "sam.saf" | "sam.mesa" => ("1.5", "SAF and MESA"),
        "sam.fsam" => ("1.6", "FSAM"),
        "sam.sam_on" => ("1.7", "SAM-ON"),
        "sam.amp" => ("1.8", "AMP"),
        "sam.fd_gr" => ("1.9", "Finite-difference gradient regularization"),
        "mixup.mixup" => ("2.1", "mixup"),
        "mixup.cutmix" | "mixup.timm" => ("2.2", "CutMix and timm's Mixup"),
        "mixup.regmixup" => ("2.3", "RegMixup"),
        "mixup.selective" | "mixup.selective_no_mix" | "mixup.resample" => ("2.4", "Selective mixup and its controls"),
        "mixup.comixup" => ("2.5", "Co-Mixup"),
        "mixup.selmix" => ("2.6", "SelMix"),
        "diffusion.ddpm" => ("3.2", "DDPM ancestral sampler"),
        "diffusion.ddim" | "diffusion.ddim_inverse" => ("3.3", "DDIM and DDIM inversion"),
        "diffusion.dpmpp_2m" | "diffusion.dpmpp_2m_sde" | "diffusion.unipc" => ("3.4", "DPM-Solver++(2M) and UniPC"),
        "diffusion.euler" | "diffusion.euler_ancestral" | "diffusion.heun" => {
            ("3.5", "Euler, Euler ancestral and Heun")
        }
        "diffusion.ddpm_ip" => ("3.6", "DDPM-IP"),
        "diffusion.cfg" | "diffusion.adaptive_guidance" => ("3.7", "Classifier-free and adaptive guidance"),
        "diffusion.closed_form" => ("3.8", "Closed-form diffusion"),
        "diffusion.pcg" => ("3.10", "Classifier-free guidance as a predictor-corrector"),
        "diffusion.nag" => ("3.11", "Normalized Attention Guidance"),
        "dro.group_dro" | "dro.reweight" | "dro.subsample" => ("4.1", "Group DRO and group balancing"),
        "dro.cvar" | "dro.chi2" => ("4.2", "CVaR and χ² DRO"),
        "dro.jtt" => ("4.3", "JTT"),
        _ => return None,
    })
}

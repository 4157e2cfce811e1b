//! The `millrace.toml` that `synth` writes beside its corpus: every domain with its
//! shards (relative paths, so the directory can move) and a mixture by the domains'
//! shares, so a synthetic corpus plans and serves as written.

use std::fmt::Write as _;

use super::{DomainSpec, Kind, Mode, SynthOptions, EOD, PAD};

/// The planner's default `best_fit_window` (units per packing window, config::plan),
/// which a length-scaled corpus divides by its scale.
pub(super) const PLANNER_WINDOW: u64 = 65536;

/// The ready-to-use config: relative paths, so the corpus directory can move.
pub(super) fn config_text(opts: &SynthOptions, mode: Mode, specs: &[DomainSpec]) -> String {
    let mut t = String::new();
    let sparse = match mode {
        Mode::Dense => String::new(),
        Mode::Sparse(s) => format!(" --sparse --length-scale {}", s.length_scale),
    };
    let _ = writeln!(
        t,
        "# Written by `millrace synth --tokens {} --domains {} --seed {} --vocab {} --dtype {}{sparse}`.",
        opts.tokens, opts.domains, opts.seed, opts.vocab, opts.dtype
    );
    let _ = writeln!(t, "# Shard paths are relative to this file. See config/millrace.example.toml for every option.\n");
    let _ = writeln!(t, "[corpus]");
    for s in specs {
        let _ = writeln!(
            t,
            "\n[[corpus.domain]]\nname = \"{}\"\nshards = [\"{}\"]",
            s.name, s.name
        );
        if matches!(s.kind, Kind::Code | Kind::Books) {
            let _ = writeln!(
                t,
                "# {}/{}-NNNNN.groups.npy sidecars name each document's {}",
                s.name,
                s.name,
                if s.kind == Kind::Code {
                    "repository"
                } else {
                    "book"
                }
            );
        }
    }
    let share_sum: f64 = specs.iter().map(|s| s.share).sum();
    // Sparse tokens read as zeros, so no document ends with EOD: the config names none
    // (an eod_token would make `millrace plan` read and warn about every document).
    let eod = match mode {
        Mode::Dense => format!("eod_token = {EOD}\n"),
        Mode::Sparse(_) => "# eod_token: none, the sparse .bin files read as zeros\n".into(),
    };
    let _ = writeln!(t, "\n[plan]\nseed = {}\nseq_len = 4096\nglobal_batch_rows = 256\npacking = \"best_fit\"\n{eod}pad_token = {PAD}\nvocab_size = {}", opts.seed, opts.vocab);
    let scale = mode.length_scale();
    if scale > 1 {
        // The planner packs windows of a number of units, so documents `scale` times
        // longer make every window `scale` times the tokens, rows and memory: the corpus
        // stands in for one of `scale` times more documents of the usual lengths, whose
        // windows hold the tokens of the default window.
        let _ = writeln!(
            t,
            "# windows of the tokens {PLANNER_WINDOW} documents of unscaled length hold\nbest_fit_window = {}",
            (PLANNER_WINDOW / scale).max(1)
        );
    }
    let weights: Vec<String> = specs
        .iter()
        .map(|s| format!("{} = {:.4}", s.name, s.share / share_sum))
        .collect();
    let _ = writeln!(
        t,
        "\n[[plan.schedule]]\nstep = 0\nweights = {{ {} }}",
        weights.join(", ")
    );
    t
}

use millrace::plan::config::SchedulePoint;
use millrace::plan::mix::{MixState, Mixer, Schedule, TICKS};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn run(n: usize, g: u32, pts: &[(u64, Vec<f64>)], steps: u64) -> Option<(u64, usize, f64, Vec<u64>, Vec<f64>)> {
    let names: Vec<String> = (0..n).map(|i| ((b'a' + i as u8) as char).to_string()).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let sp: Vec<SchedulePoint> = pts.iter().map(|(s, w)| SchedulePoint { step: *s, weights: names.iter().cloned().zip(w.iter().copied()).collect::<BTreeMap<_,_>>() }).collect();
    let m = Mixer { schedule: Schedule::new(&sp, &refs), fill: vec![1.0; n], rows: g, bursty: vec![None; n] };
    let mut st = MixState::new(n);
    let mut nom = vec![0i64; n];
    for s in 0..steps {
        m.counts(&mut st, s);
        let nn = m.nominal(s);
        for d in 0..n { nom[d] += nn[d]; }
        for d in 0..n {
            let dev = (st.rows[d] as i64 * TICKS - nom[d]) as f64 / TICKS as f64;
            if dev.abs() > 1.0 + 1e-9 { return Some((s, d, dev, st.rows.clone(), nom.iter().map(|x| *x as f64 / TICKS as f64).collect())); }
        }
    }
    None
}

#[test]
fn mixer_min() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
    let mut best: Option<(u64, String)> = None;
    for _ in 0..2000000 {
        let n = rng.gen_range(2..=4usize);
        let g = rng.gen_range(1..=4u32);
        let np = rng.gen_range(1..=3);
        let mut pts = vec![];
        let mut step = 0;
        for k in 0..np {
            if k > 0 { step += rng.gen_range(1..=3); }
            let mut w: Vec<f64> = (0..n).map(|_| if rng.gen_bool(0.4) {0.0} else {rng.gen_range(1..=4) as f64}).collect();
            if w.iter().sum::<f64>() == 0.0 { w[0] = 1.0; }
            pts.push((step, w));
        }
        if let Some((s, d, dev, rows, nom)) = run(n, g, &pts, 30) {
            let score = n as u64 * 10000 + np as u64 * 1000 + g as u64 * 100 + s;
            if best.as_ref().map_or(true, |b| score < b.0) {
                best = Some((score, format!("n {n} G {g} pts {pts:?} step {s} domain {d} dev {dev} rows {rows:?} target {nom:?}")));
            }
        }
    }
    eprintln!("{:?}", best);
}

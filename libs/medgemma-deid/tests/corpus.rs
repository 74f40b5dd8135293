//! The committed corpus (tools/deid/make_corpus.py) and the rules-only detector on its held-out
//! split: the targets (token recall >= 0.95, precision >= 0.85).

use medgemma_deid::{PhiType, eval};

fn split(name: &str) -> Vec<eval::Note> {
    let p = medgemma_test_support::fixture(format!("deid/{name}.jsonl"));
    eval::load(&p).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_corpus_is_large_labelled_and_covers_every_type() {
    let dev = split("dev");
    let test = split("test");
    let all: Vec<&eval::Note> = dev.iter().chain(&test).collect();
    assert!(all.len() >= 200, "{} notes", all.len());
    let spans: usize = all.iter().map(|n| n.spans.len()).sum();
    assert!(spans >= 2000, "{spans} spans");
    for lang in ["en", "zh-TW"] {
        for (name, notes) in [("dev", &dev), ("test", &test)] {
            assert!(
                notes.iter().any(|n| n.lang == lang && n.split == name),
                "{lang} {name}"
            );
        }
    }
    for t in PhiType::ALL {
        for (name, notes) in [("dev", &dev), ("test", &test)] {
            assert!(
                notes
                    .iter()
                    .flat_map(|n| &n.spans)
                    .any(|s| s.ty == t.as_str()),
                "{t} in {name}"
            );
        }
    }
    // The held-out notes are other notes.
    let dev_texts: std::collections::HashSet<&str> = dev.iter().map(|n| n.text.as_str()).collect();
    assert!(test.iter().all(|n| !dev_texts.contains(n.text.as_str())));
}

#[test]
fn rules_only_meets_the_targets_on_the_held_out_split() {
    let test = split("test");
    let r = eval::evaluate(&test, eval::rules_only);
    let o = r.overall;
    eprintln!(
        "held-out rules-only: token recall {:.4}, precision {:.4}, span recall {:.4}, leak {:.4}",
        o.token_recall(),
        o.precision(),
        o.span_recall(),
        o.leak_rate()
    );
    assert!(
        o.token_recall() >= 0.95,
        "token recall {}",
        o.token_recall()
    );
    assert!(o.precision() >= 0.85, "precision {}", o.precision());
    for lang in ["en", "zh-TW"] {
        let r = eval::evaluate(test.iter().filter(|n| n.lang == lang), eval::rules_only);
        assert!(
            r.overall.token_recall() >= 0.95,
            "{lang}: {}",
            r.overall.token_recall()
        );
    }
}

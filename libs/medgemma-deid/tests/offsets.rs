//! Property test: over random text mixing ASCII, CJK, combining marks, emoji, full-width forms
//! and planted identifiers, every span names exactly the characters its offsets say (code
//! points and bytes agree, whole characters, disjoint, in order), planted identifiers are
//! covered, and each mode replaces exactly the spans.

use medgemma_deid::{Mode, deidentify, normalize::is_attached};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PLANTED: &[&str] = &[
    "jane.roe@example.org",
    "A123456789",
    "0912-345-678",
    "2023-03-05",
    "民國112年3月5日",
    "192.168.1.20",
    "123-45-6789",
    "(415) 555-0172",
];

fn noise_char(rng: &mut ChaCha8Rng) -> char {
    let ranges: &[(u32, u32)] = &[
        (0x20, 0x7E),       // ASCII
        (0x4E00, 0x9FFF),   // CJK
        (0x0300, 0x036F),   // combining diacritics
        (0x1F300, 0x1F5FF), // emoji
        (0xFF01, 0xFF5E),   // full-width forms
        (0x3000, 0x303F),   // CJK punctuation
        (0x00C0, 0x024F),   // Latin with diacritics
        (0x0590, 0x05FF),   // Hebrew (marks included)
        (0x200B, 0x200F),   // zero-width
    ];
    loop {
        let (lo, hi) = ranges[rng.random_range(0..ranges.len())];
        if let Some(c) = char::from_u32(rng.random_range(lo..=hi)) {
            return c;
        }
    }
}

#[test]
fn spans_name_exactly_their_characters() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for case in 0..3000 {
        let mut text = String::new();
        let mut planted = Vec::new();
        for _ in 0..rng.random_range(1..12) {
            for _ in 0..rng.random_range(0..40) {
                text.push(noise_char(&mut rng));
            }
            if rng.random_bool(0.5) {
                let p = PLANTED[rng.random_range(0..PLANTED.len())];
                text.push(' ');
                text.push_str(p);
                text.push(' ');
                planted.push(p);
            } else if rng.random_bool(0.3) {
                text.push('\n');
            }
        }
        let out = deidentify(&text, None, Mode::Redact);
        let mut prev_end = 0;
        for s in &out.spans {
            assert!(
                text.is_char_boundary(s.byte_start) && text.is_char_boundary(s.byte_end),
                "case {case}"
            );
            assert!(
                s.byte_start < s.byte_end && s.byte_start >= prev_end,
                "case {case}: order"
            );
            assert_eq!(
                text[..s.byte_start].chars().count(),
                s.start,
                "case {case}: start"
            );
            assert_eq!(
                text[s.byte_start..s.byte_end].chars().count(),
                s.end - s.start,
                "case {case}: length"
            );
            let named: String = text.chars().skip(s.start).take(s.end - s.start).collect();
            assert_eq!(named, s.text(&text), "case {case}");
            assert!(
                !named.starts_with(is_attached) || s.start == 0,
                "case {case}: starts on a mark"
            );
            assert!(
                !text[s.byte_end..].starts_with(is_attached),
                "case {case}: ends before a mark"
            );
            assert!(s.confidence > 0.0 && s.confidence <= 1.0);
            prev_end = s.byte_end;
        }
        for p in &planted {
            assert!(
                !out.text.contains(p),
                "case {case}: {p:?} left in {:?}",
                out.text
            );
        }
        let masked = deidentify(&text, None, Mode::Mask('*'));
        assert_eq!(
            masked.text.chars().count(),
            text.chars().count(),
            "case {case}"
        );
        let covered: usize = out.spans.iter().map(|s| s.end - s.start).sum();
        assert_eq!(
            masked.text.chars().filter(|&c| c == '*').count()
                - text.chars().filter(|&c| c == '*').count(),
            covered,
            "case {case}"
        );
        let sur = deidentify(&text, None, Mode::Surrogate { seed: case });
        for p in &planted {
            assert!(
                !sur.text.contains(p),
                "case {case}: {p:?} left in surrogate text"
            );
        }
    }
}

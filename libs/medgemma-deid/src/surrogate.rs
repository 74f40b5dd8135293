//! Realistic fakes for SURROGATE mode, consistent within one text: the same value always gets
//! the same fake (names part by part, so "John Smith" and "Mr. Smith" stay one person), every
//! date moves by one offset, ages over 89 become "90 or older". Seeded: the same seed gives the
//! same fakes.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::lexicon;
use crate::rules;
use crate::types::{PhiType, is_han};

/// The fakes of one text.
#[derive(Debug)]
pub struct Surrogates {
    rng: ChaCha8Rng,
    shift_days: i64,
    values: HashMap<(PhiType, String), String>,
    name_parts: HashMap<String, String>,
}

impl Surrogates {
    /// Fakes seeded by `seed`; the date offset is drawn from it (30 to 365 days, either way).
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let days = rng.random_range(30..=365);
        let shift_days = if rng.random_bool(0.5) { days } else { -days };
        Self {
            rng,
            shift_days,
            values: HashMap::new(),
            name_parts: HashMap::new(),
        }
    }

    /// The date offset in days.
    pub fn shift_days(&self) -> i64 {
        self.shift_days
    }

    /// The fake for `original` of type `ty`.
    pub fn fake(&mut self, ty: PhiType, original: &str) -> String {
        let key = (ty, original.trim().to_lowercase());
        if let Some(v) = self.values.get(&key) {
            return v.clone();
        }
        let mut v = self.make(ty, original);
        for _ in 0..4 {
            if v != original {
                break;
            }
            v = self.make(ty, original);
        }
        self.values.insert(key, v.clone());
        v
    }

    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[self.rng.random_range(0..list.len())]
    }

    fn pick_char(&mut self, chars: &str) -> char {
        let v: Vec<char> = chars.chars().collect();
        v[self.rng.random_range(0..v.len())]
    }

    fn make(&mut self, ty: PhiType, s: &str) -> String {
        let han = s.chars().any(is_han);
        match ty {
            PhiType::Name => {
                if han {
                    self.zh_name(s)
                } else {
                    self.en_name(s)
                }
            }
            PhiType::Organization => {
                if han {
                    self.pick(lexicon::FAKE_ORG_ZH).to_owned()
                } else {
                    self.pick(lexicon::FAKE_ORG_EN).to_owned()
                }
            }
            PhiType::Address => {
                if han {
                    let n = self.rng.random_range(1..300);
                    let city = self.pick(lexicon::FAKE_CITY_ZH);
                    let street = self.pick(lexicon::FAKE_STREET_ZH);
                    if s.contains('號') {
                        format!("{city}{street}{n}號")
                    } else {
                        city.to_owned()
                    }
                } else if s.starts_with(|c: char| c.is_ascii_digit()) {
                    let n = self.rng.random_range(10..9999);
                    format!("{n} {}", self.pick(lexicon::FAKE_STREET_EN))
                } else {
                    self.pick(lexicon::FAKE_CITY_EN).to_owned()
                }
            }
            PhiType::Date => {
                crate::dates::shift(s, self.shift_days).unwrap_or_else(|| self.same_shape(s, 0))
            }
            PhiType::Age => {
                if han {
                    "90歲以上".to_owned()
                } else {
                    "90 or older".to_owned()
                }
            }
            PhiType::Email => {
                let user = self.pick(lexicon::FAKE_GIVEN_EN).to_ascii_lowercase();
                format!("{user}{}@example.org", self.rng.random_range(10..999))
            }
            PhiType::Url => format!(
                "https://example.org/{}",
                self.same_shape("a1b2c3d4", 0).to_ascii_lowercase()
            ),
            PhiType::Ip => {
                if s.contains(':') {
                    format!("2001:db8::{:x}", self.rng.random_range(1..0xffff))
                } else {
                    format!("192.0.2.{}", self.rng.random_range(1..255))
                }
            }
            PhiType::Ssn => {
                let mut area = self.rng.random_range(1..900);
                if area == 666 {
                    area = 665;
                }
                let group = self.rng.random_range(1..100);
                let serial = self.rng.random_range(1..10000);
                if s.contains('-') {
                    format!("{area:03}-{group:02}-{serial:04}")
                } else {
                    format!("{area:03}{group:02}{serial:04}")
                }
            }
            PhiType::NationalId if s.len() == 10 && s.is_ascii() => {
                let mut b: Vec<u8> = self.same_shape(s, 2).into_bytes();
                b[0] = self.rng.random_range(b'A'..=b'H');
                if let Some(c) = rules::tw_id_check_digit(&b[..9]) {
                    b[9] = b'0' + c;
                }
                String::from_utf8(b).unwrap_or_default()
            }
            PhiType::Account => {
                let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).collect();
                let v = self.same_shape(s, 0);
                if digits.len() >= 13
                    && rules::luhn_valid(&digits.iter().map(|d| d - b'0').collect::<Vec<_>>())
                {
                    fix_luhn(&v)
                } else {
                    v
                }
            }
            PhiType::Phone | PhiType::Fax => {
                let keep = ["+886", "+1", "001", "09", "0"]
                    .iter()
                    .find(|p| s.starts_with(*p))
                    .map_or(0, |p| p.len());
                self.same_shape(s, keep)
            }
            PhiType::Photo => match s.rfind('.') {
                Some(dot) => format!("{}{}", self.same_shape(&s[..dot], 0), &s[dot..]),
                None => self.same_shape(s, 0),
            },
            _ => self.same_shape(s, 0),
        }
    }

    /// Digits become random digits, letters random letters of the same case, from byte `keep`
    /// on; everything else stays.
    fn same_shape(&mut self, s: &str, keep: usize) -> String {
        let mut out = String::with_capacity(s.len());
        for (i, c) in s.char_indices() {
            if i < keep {
                out.push(c);
            } else if c.is_ascii_digit() {
                out.push(char::from(b'0' + self.rng.random_range(0..10u8)));
            } else if c.is_ascii_uppercase() {
                out.push(char::from(b'A' + self.rng.random_range(0..26u8)));
            } else if c.is_ascii_lowercase() {
                out.push(char::from(b'a' + self.rng.random_range(0..26u8)));
            } else if is_han(c) {
                out.push(self.pick_char(lexicon::FAKE_GIVEN_ZH));
            } else {
                out.push(c);
            }
        }
        out
    }

    fn en_name(&mut self, s: &str) -> String {
        let words: Vec<&str> = s.split_whitespace().collect();
        let n = words.len();
        let mut out = Vec::with_capacity(n);
        for (i, w) in words.iter().enumerate() {
            let key = w.trim_end_matches(['.', ',']).to_lowercase();
            if w.len() <= 2 && w.ends_with('.') {
                // An initial.
                let c = char::from(b'A' + self.rng.random_range(0..26u8));
                out.push(format!("{c}."));
                continue;
            }
            let fake = match self.name_parts.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let given = n > 1 && i == 0;
                    let f = if given {
                        self.pick(lexicon::FAKE_GIVEN_EN)
                    } else {
                        self.pick(lexicon::FAKE_SURNAME_EN)
                    }
                    .to_owned();
                    self.name_parts.insert(key, f.clone());
                    f
                }
            };
            if w.len() > 1 && w.chars().all(|c| !c.is_lowercase()) {
                out.push(fake.to_uppercase());
            } else {
                out.push(fake);
            }
        }
        out.join(" ")
    }

    fn zh_name(&mut self, s: &str) -> String {
        let s = s.trim();
        let surname_len = lexicon::COMPOUND_SURNAMES
            .iter()
            .find(|c| s.starts_with(*c))
            .map(|c| c.len())
            .unwrap_or_else(|| s.chars().next().map_or(0, char::len_utf8));
        let (surname, given) = s.split_at(surname_len);
        let fs = match self.name_parts.get(&format!("s:{surname}")) {
            Some(f) => f.clone(),
            None => {
                let f = self.pick_char(lexicon::FAKE_SURNAME_ZH).to_string();
                self.name_parts.insert(format!("s:{surname}"), f.clone());
                f
            }
        };
        if given.is_empty() {
            return fs;
        }
        let fg = match self.name_parts.get(&format!("g:{given}")) {
            Some(f) => f.clone(),
            None => {
                let f: String = given
                    .chars()
                    .map(|_| self.pick_char(lexicon::FAKE_GIVEN_ZH))
                    .collect();
                self.name_parts.insert(format!("g:{given}"), f.clone());
                f
            }
        };
        format!("{fs}{fg}")
    }
}

/// `s` with its last digit set so that its digits pass Luhn.
fn fix_luhn(s: &str) -> String {
    let Some(last) = s.rfind(|c: char| c.is_ascii_digit()) else {
        return s.to_owned();
    };
    for d in b'0'..=b'9' {
        let mut b = s.as_bytes().to_vec();
        b[last] = d;
        let digits: Vec<u8> = b
            .iter()
            .filter(|c| c.is_ascii_digit())
            .map(|c| c - b'0')
            .collect();
        if rules::luhn_valid(&digits) {
            return String::from_utf8(b).unwrap_or_default();
        }
    }
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_and_seeded() {
        let mut a = Surrogates::new(7);
        let mut b = Surrogates::new(7);
        let n1 = a.fake(PhiType::Name, "John Smith");
        let n2 = a.fake(PhiType::Name, "Smith");
        assert_eq!(n1.split(' ').nth(1), Some(n2.as_str()), "{n1} / {n2}");
        assert_eq!(a.fake(PhiType::Name, "John Smith"), n1);
        assert_eq!(b.fake(PhiType::Name, "John Smith"), n1);
        let z1 = a.fake(PhiType::Name, "王小明");
        let z2 = a.fake(PhiType::Name, "王");
        assert!(z1.starts_with(&z2) && z1.chars().count() == 3, "{z1} {z2}");
        assert_eq!(a.fake(PhiType::Age, "95-year-old"), "90 or older");
        assert_eq!(a.fake(PhiType::Age, "95歲"), "90歲以上");
        let id = a.fake(PhiType::NationalId, "A123456789");
        assert!(rules::tw_id_valid(&id) && id != "A123456789", "{id}");
        let card = a.fake(PhiType::Account, "4111 1111 1111 1111");
        let digits: Vec<u8> = card
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|d| d - b'0')
            .collect();
        assert!(rules::luhn_valid(&digits) && card.len() == 19, "{card}");
        let p = a.fake(PhiType::Phone, "0912-345-678");
        assert!(
            p.starts_with("09") && p.len() == 12 && p != "0912-345-678",
            "{p}"
        );
    }

    #[test]
    fn dates_move_together() {
        let mut s = Surrogates::new(1);
        let d = s.shift_days();
        assert!((30..=365).contains(&d.abs()));
        let a = s.fake(PhiType::Date, "2023-03-05");
        let b = s.fake(PhiType::Date, "2023-03-15");
        let day = |x: &str| {
            let p: Vec<i64> = x.split('-').map(|v| v.parse().unwrap()).collect();
            crate::dates::days_from_civil(p[0], p[1] as u32, p[2] as u32)
        };
        assert_eq!(day(&b) - day(&a), 10);
        assert_eq!(day(&a) - day("2023-03-05"), d);
    }
}

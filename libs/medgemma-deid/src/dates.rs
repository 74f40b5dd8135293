//! Dates as the recognizers find them (English, ISO, ROC, Chinese numerals), read into
//! year/month/day and written back in the same form after a shift: the surrogate mode moves
//! every date of a note by one offset, so intervals survive.

const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    /// Digits: value, width, whether an ordinal suffix (`st`) follows (its bytes included).
    Num(u32, usize, bool),
    /// Chinese numerals.
    Han(u32),
    /// A month name: month (1-12), whether abbreviated, whether upper-case.
    Month(u32, bool, bool),
    /// A weekday name.
    Weekday(bool),
}

/// A piece of the date text: the token and its byte range.
type Piece = (Tok, usize, usize);

fn tokenize(s: &str) -> Vec<Piece> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i..].chars().next().unwrap_or(' ');
        if c.is_ascii_digit() {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let v = s[i..j].parse().unwrap_or(0);
            let rest = s[j..].to_ascii_lowercase();
            let ord = ["st", "nd", "rd", "th"].iter().any(|x| rest.starts_with(x));
            let end = if ord { j + 2 } else { j };
            out.push((Tok::Num(v, j - i, ord), i, end));
            i = end;
        } else if "〇○零一二三四五六七八九十".contains(c) {
            let mut j = i;
            for ch in s[i..].chars() {
                if "〇○零一二三四五六七八九十".contains(ch) {
                    j += ch.len_utf8();
                } else {
                    break;
                }
            }
            out.push((Tok::Han(crate::rules::zh_number(&s[i..j])), i, j));
            i = j;
        } else if c.is_ascii_alphabetic() {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_alphabetic() {
                j += 1;
            }
            let w = &s[i..j];
            let lw = w.to_ascii_lowercase();
            let upper = w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase());
            if let Some(m) = MONTH_NAMES.iter().position(|n| {
                n.to_ascii_lowercase() == lw
                    || (lw.len() >= 3 && n.to_ascii_lowercase().starts_with(&lw))
            }) {
                out.push((
                    Tok::Month(m as u32 + 1, lw.len() < MONTH_NAMES[m].len(), upper),
                    i,
                    j,
                ));
            } else if WEEKDAYS
                .iter()
                .any(|d| d.to_ascii_lowercase().starts_with(&lw) && lw.len() >= 3)
            {
                out.push((Tok::Weekday(lw.len() <= 4), i, j));
            }
            i = j;
        } else {
            i += c.len_utf8();
        }
    }
    out
}

/// Which piece holds the year, month and day, and how the year is written.
#[derive(Debug, Clone, Copy)]
struct Layout {
    year: Option<usize>,
    month: usize,
    day: Option<usize>,
    roc: bool,
}

fn value(t: Tok) -> u32 {
    match t {
        Tok::Num(v, ..) | Tok::Han(v) | Tok::Month(v, ..) => v,
        Tok::Weekday(_) => 0,
    }
}

fn layout(s: &str, toks: &[Piece]) -> Option<Layout> {
    let nums: Vec<usize> = toks
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.0, Tok::Num(..) | Tok::Han(_)))
        .map(|(i, _)| i)
        .collect();
    if s.contains('月') {
        // Chinese: the number before 年 is the year, before 月 the month, before 日/號 the day.
        let before = |marker: char| {
            let pos = s.find(marker)?;
            nums.iter().rev().copied().find(|&i| toks[i].2 <= pos)
        };
        let year = if s.contains('年') {
            before('年')
        } else {
            None
        };
        let month = before('月')?;
        let day = ['日', '號', '号'].iter().find_map(|&m| {
            let i = before(m)?;
            (i != month).then_some(i)
        });
        let roc = s.contains("民國")
            || (!s.contains("西元")
                && !s.contains("公元")
                && year.is_some_and(|y| value(toks[y].0) < 1000));
        return Some(Layout {
            year,
            month,
            day,
            roc,
        });
    }
    if let Some(mi) = toks.iter().position(|t| matches!(t.0, Tok::Month(..))) {
        let mut year = None;
        let mut day = None;
        for &i in &nums {
            match toks[i].0 {
                Tok::Num(_, 4, _) => year = Some(i),
                Tok::Num(..) if i < mi && day.is_none() => day = Some(i),
                Tok::Num(..) if i > mi && day.is_none() => day = Some(i),
                Tok::Num(..) if i > mi => year = Some(i),
                _ => {}
            }
        }
        return Some(Layout {
            year,
            month: mi,
            day,
            roc: false,
        });
    }
    let roc_prefix = s.contains("民國");
    match *nums.as_slice() {
        [a, b] => Some(Layout {
            year: None,
            month: a,
            day: Some(b),
            roc: false,
        }),
        [a, b, c] => {
            let (va, wa, vb) = match (toks[a].0, toks[b].0) {
                (Tok::Num(va, wa, _), Tok::Num(vb, ..)) => (va, wa, vb),
                _ => return None,
            };
            let wc = match toks[c].0 {
                Tok::Num(_, w, _) => w,
                _ => return None,
            };
            if wa == 4 {
                Some(Layout {
                    year: Some(a),
                    month: b,
                    day: Some(c),
                    roc: false,
                })
            } else if roc_prefix || wa == 3 || (wc <= 2 && va > 31) {
                Some(Layout {
                    year: Some(a),
                    month: b,
                    day: Some(c),
                    roc: true,
                })
            } else if va > 12 && vb <= 12 {
                Some(Layout {
                    year: Some(c),
                    month: b,
                    day: Some(a),
                    roc: false,
                })
            } else {
                Some(Layout {
                    year: Some(c),
                    month: a,
                    day: Some(b),
                    roc: false,
                })
            }
        }
        _ => None,
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn han_digits(v: i64) -> String {
    const D: [char; 10] = ['〇', '一', '二', '三', '四', '五', '六', '七', '八', '九'];
    v.to_string()
        .chars()
        .map(|c| D[c.to_digit(10).unwrap_or(0) as usize])
        .collect()
}

fn han_small(v: u32) -> String {
    const D: [&str; 10] = ["", "一", "二", "三", "四", "五", "六", "七", "八", "九"];
    match v {
        0..=9 => D[v as usize].to_owned(),
        10..=19 => format!("十{}", D[(v % 10) as usize]),
        _ => format!("{}十{}", D[(v / 10) as usize], D[(v % 10) as usize]),
    }
}

fn ordinal(d: u32) -> &'static str {
    match (d % 10, d % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    }
}

/// `new` written as wide as `old` was when `old` was zero-padded (`03`), else plainly.
fn pad(new: u32, old: u32, width: usize) -> String {
    if width > 1 && old < 10u32.pow(width as u32 - 1) {
        format!("{new:0width$}")
    } else {
        new.to_string()
    }
}

/// `s` (a date as the recognizers find it) moved by `days`, written in the same form; `None`
/// when it cannot be read as a date.
pub fn shift(s: &str, days: i64) -> Option<String> {
    let toks = tokenize(s);
    let l = layout(s, &toks)?;
    let month = value(toks[l.month].0);
    let day = l.day.map_or(15, |i| value(toks[i].0));
    let year = l.year.map(|i| {
        let (v, w) = match toks[i].0 {
            Tok::Num(v, w, _) => (i64::from(v), w),
            Tok::Han(v) => (i64::from(v), 3),
            _ => (0, 0),
        };
        if l.roc {
            v + 1911
        } else if w == 2 {
            if v < 50 { 2000 + v } else { 1900 + v }
        } else {
            v
        }
    });
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let base_year = year.unwrap_or(if month == 2 && day == 29 { 2000 } else { 2001 });
    let (ny, nm, nd) = civil_from_days(days_from_civil(base_year, month, day) + days);
    let mut out = String::with_capacity(s.len() + 4);
    let mut last = 0;
    for (i, &(t, a, b)) in toks.iter().enumerate() {
        let new = if Some(i) == l.year {
            match t {
                Tok::Num(_, w, _) => {
                    if l.roc {
                        (ny - 1911).to_string()
                    } else if w == 2 {
                        format!("{:02}", ny.rem_euclid(100))
                    } else {
                        ny.to_string()
                    }
                }
                Tok::Han(_) => han_digits(if l.roc { ny - 1911 } else { ny }),
                _ => continue,
            }
        } else if i == l.month {
            match t {
                Tok::Num(v, w, _) => pad(nm, v, w),
                Tok::Han(_) => han_small(nm),
                Tok::Month(_, abbr, upper) => {
                    let full = MONTH_NAMES[nm as usize - 1];
                    let orig = &s[a..b];
                    let name = if abbr {
                        if orig.len() == 4 && nm == 9 {
                            "Sept"
                        } else {
                            &full[..3]
                        }
                    } else {
                        full
                    };
                    if upper {
                        name.to_ascii_uppercase()
                    } else {
                        name.to_owned()
                    }
                }
                Tok::Weekday(_) => continue,
            }
        } else if Some(i) == l.day && l.day.is_some() {
            match t {
                Tok::Num(v, w, ord) => {
                    let n = pad(nd, v, w);
                    if ord {
                        format!("{n}{}", ordinal(nd))
                    } else {
                        n
                    }
                }
                Tok::Han(_) => han_small(nd),
                _ => continue,
            }
        } else if let Tok::Weekday(abbr) = t {
            if year.is_none() {
                continue;
            }
            // 1970-01-01 was a Thursday.
            let wd = (days_from_civil(ny, nm, nd) + 3).rem_euclid(7) as usize;
            let name = WEEKDAYS[wd];
            let orig = &s[a..b];
            let w = if abbr {
                &name[..orig.len().min(name.len())]
            } else {
                name
            };
            if orig.chars().all(|c| c.is_ascii_uppercase()) {
                w.to_ascii_uppercase()
            } else {
                w.to_owned()
            }
        } else {
            continue;
        };
        out.push_str(&s[last..a]);
        out.push_str(&new);
        last = b;
    }
    out.push_str(&s[last..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for z in [-800_000i64, -1, 0, 1, 11_016, 19_000, 60_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(19_421), (2023, 3, 5));
    }

    #[test]
    fn shifts_keep_the_form() {
        assert_eq!(shift("03/05/2023", 10).unwrap(), "03/15/2023");
        assert_eq!(shift("2023-03-05", -5).unwrap(), "2023-02-28");
        assert_eq!(shift("March 5, 2023", 30).unwrap(), "April 4, 2023");
        assert_eq!(shift("Mar. 5th", 1).unwrap(), "Mar. 6th");
        assert_eq!(shift("5 MAR 2023", 27).unwrap(), "1 APR 2023");
        assert_eq!(shift("民國112年3月5日", 1).unwrap(), "民國112年3月6日");
        assert_eq!(shift("112/03/05", 30).unwrap(), "112/04/04");
        assert_eq!(shift("2023年12月31日", 1).unwrap(), "2024年1月1日");
        assert_eq!(shift("一一二年三月五日", 10).unwrap(), "一一二年三月十五日");
        assert_eq!(
            shift("Sunday, March 5, 2023", 1).unwrap(),
            "Monday, March 6, 2023"
        );
        assert_eq!(shift("March 2023", 31).unwrap(), "April 2023");
        assert!(shift("no date", 3).is_none());
    }
}

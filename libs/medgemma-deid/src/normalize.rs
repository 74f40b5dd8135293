//! The recognizers read a normalised copy of the text (full-width ASCII forms such as `０９１２`
//! and `：` become ASCII, the ideographic space a space) with a map from every byte of the copy
//! back to the input, so spans always land on the input's own characters.

/// A normalised view of an input.
#[derive(Debug)]
pub struct Normalized<'a> {
    input: &'a str,
    owned: Option<(String, Vec<usize>)>,
}

fn fold(c: char) -> Option<char> {
    match c as u32 {
        0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFF01 + 0x21),
        0x3000 => Some(' '),
        _ => None,
    }
}

impl<'a> Normalized<'a> {
    /// The view of `input`; no copy when nothing changes.
    pub fn new(input: &'a str) -> Self {
        if !input.chars().any(|c| fold(c).is_some()) {
            return Self { input, owned: None };
        }
        let mut text = String::with_capacity(input.len());
        let mut map = Vec::with_capacity(input.len() + 1);
        for (i, c) in input.char_indices() {
            let n = fold(c).unwrap_or(c);
            let before = text.len();
            text.push(n);
            for _ in before..text.len() {
                map.push(i);
            }
        }
        map.push(input.len());
        Self {
            input,
            owned: Some((text, map)),
        }
    }

    /// The text the recognizers read.
    pub fn text(&self) -> &str {
        match &self.owned {
            Some((t, _)) => t,
            None => self.input,
        }
    }

    /// The input byte offset of normalised byte offset `i` (a char boundary of the copy).
    pub fn to_input(&self, i: usize) -> usize {
        match &self.owned {
            Some((_, map)) => map[i],
            None => i,
        }
    }

    /// The input.
    pub fn input(&self) -> &'a str {
        self.input
    }
}

/// Whether `c` attaches to the character before it (combining marks, joiners, variation
/// selectors): a span never ends just before one.
pub fn is_attached(c: char) -> bool {
    matches!(c as u32,
        0x0300..=0x036F | 0x0483..=0x0489 | 0x0591..=0x05BD | 0x0610..=0x061A | 0x064B..=0x065F
        | 0x0E31 | 0x0E34..=0x0E3A | 0x0E47..=0x0E4E | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF
        | 0x200C | 0x200D | 0x20D0..=0x20FF | 0x302A..=0x302F | 0x3099 | 0x309A
        | 0xFE00..=0xFE0F | 0xFE20..=0xFE2F | 0xE0100..=0xE01EF)
}

/// Code-point offsets of sorted byte offsets: `out[k]` is the number of chars of `text` before
/// byte `sorted[k]`. One pass over the text.
pub fn char_offsets(text: &str, sorted: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(sorted.len());
    let (mut byte, mut chars) = (0usize, 0usize);
    let bytes = text.as_bytes();
    for &b in sorted {
        debug_assert!(b >= byte);
        while byte < b {
            // Count char starts (bytes that are not UTF-8 continuation bytes).
            if bytes[byte] & 0xC0 != 0x80 {
                chars += 1;
            }
            byte += 1;
        }
        out.push(chars);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_width_maps_back() {
        let s = "電話：０９１２－３４５６７８ ok";
        let n = Normalized::new(s);
        assert_eq!(n.text(), "電話:0912-345678 ok");
        let i = n.text().find("0912").unwrap();
        let j = i + "0912-345678".len();
        assert_eq!(&s[n.to_input(i)..n.to_input(j)], "０９１２－３４５６７８");
        let plain = Normalized::new("abc");
        assert_eq!(plain.text(), "abc");
        assert_eq!(plain.to_input(2), 2);
    }

    #[test]
    fn char_offsets_count_code_points() {
        let s = "a王b😀c";
        let bytes: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        assert_eq!(char_offsets(s, &bytes), vec![0, 1, 2, 3, 4, 5]);
    }
}

//! Special tokens of two origins in one text: the chat template's own markers, which are
//! matched as special tokens, and the caller's text, where `<start_of_turn>`, `<end_of_turn>`,
//! `<image_soft_token>`, `<bos>` and the like are ordinary text.
//!
//! The caller's text is *escaped* before the template renders it: each special-token string
//! becomes `S{k}S`, where `S` is a code point found in none of the texts (from Unicode's
//! supplementary private use area) and `k` the token's index. Every special token left in the
//! rendered text is then the template's. [`Specials::encode`] splits the rendered text at
//! those, as `tokenizers` itself splits at added tokens (leftmost-longest), turns each into
//! its id, and encodes the text between them, escapes restored, with special-token matching
//! off. For text without special tokens the ids are exactly those of encoding the whole
//! rendered text at once.

use aho_corasick::{AhoCorasick, MatchKind};

use crate::error::{Result, TokenizerError};

/// The first code point tried as the escape sentinel (plane 15, private use).
const SENTINEL_FIRST: u32 = 0xF_0000;
/// The last one (U+FFFFD; U+FFFFE and U+FFFFF are noncharacters).
const SENTINEL_LAST: u32 = 0xF_FFFD;

/// The special tokens of a vocabulary and a copy of the tokenizer that does not match them.
#[derive(Debug, Clone)]
pub(crate) struct Specials {
    strings: Vec<String>,
    ids: Vec<u32>,
    matcher: AhoCorasick,
    /// The same tokenizer with `encode_special_tokens` on: special tokens are not split out.
    plain: tokenizers::Tokenizer,
}

impl Specials {
    /// From a tokenizer: its added tokens marked `special`.
    pub(crate) fn new(inner: &tokenizers::Tokenizer) -> std::result::Result<Self, String> {
        let mut specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort_unstable();
        let (ids, strings): (Vec<u32>, Vec<String>) = specials.into_iter().unzip();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&strings)
            .map_err(|e| e.to_string())?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            strings,
            ids,
            matcher,
            plain,
        })
    }

    /// The special tokens' ids, in id order.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// A sentinel code point that occurs in none of `texts`.
    pub(crate) fn sentinel<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<char> {
        let mut used = vec![false; (SENTINEL_LAST - SENTINEL_FIRST + 1) as usize];
        for text in texts {
            for c in text.chars() {
                let c = c as u32;
                if (SENTINEL_FIRST..=SENTINEL_LAST).contains(&c) {
                    used[(c - SENTINEL_FIRST) as usize] = true;
                }
            }
        }
        used.iter()
            .position(|&u| !u)
            .and_then(|i| char::from_u32(SENTINEL_FIRST + i as u32))
            .ok_or_else(|| {
                TokenizerError::InvalidText("uses every code point of Unicode plane 15".into())
            })
    }

    /// `text` with every special-token string written as `S{index}S`.
    pub(crate) fn escape(&self, text: &str, sentinel: char) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in self.matcher.find_iter(text) {
            out.push_str(&text[last..m.start()]);
            out.push(sentinel);
            out.push_str(&m.pattern().as_usize().to_string());
            out.push(sentinel);
            last = m.end();
        }
        out.push_str(&text[last..]);
        out
    }

    /// Undoes [`escape`](Self::escape).
    fn unescape<'a>(&self, text: &'a str, sentinel: char) -> std::borrow::Cow<'a, str> {
        if !text.contains(sentinel) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut pieces = text.split(sentinel);
        out.push_str(pieces.next().unwrap_or_default());
        // Pieces alternate: an index, then the text up to the next escape.
        while let (Some(index), Some(rest)) = (pieces.next(), pieces.next()) {
            match index
                .parse::<usize>()
                .ok()
                .and_then(|k| self.strings.get(k))
            {
                Some(token) => out.push_str(token),
                None => {
                    out.push(sentinel);
                    out.push_str(index);
                    out.push(sentinel);
                }
            }
            out.push_str(rest);
        }
        std::borrow::Cow::Owned(out)
    }

    /// Ordinary text to ids: special-token strings in it are not matched.
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.plain
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Tokenizers {
                op: "encode",
                reason: e.to_string(),
            })
    }

    /// A rendered template to ids: its special tokens matched, escaped text as ordinary text.
    pub(crate) fn encode(&self, text: &str, sentinel: char) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut last = 0;
        for m in self.matcher.find_iter(text) {
            if m.start() > last {
                ids.extend(self.encode_plain(&self.unescape(&text[last..m.start()], sentinel))?);
            }
            ids.push(self.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        if last < text.len() {
            ids.extend(self.encode_plain(&self.unescape(&text[last..], sentinel))?);
        }
        Ok(ids)
    }
}

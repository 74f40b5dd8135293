//! Streaming detokenization: text deltas that never split a UTF-8 character.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Turns generated ids, fed one at a time, into text deltas.
///
/// A delta is given out only once the decoded text no longer ends in U+FFFD, so byte-fallback
/// pieces (`<0xE9>`, `<0xBE>`, `<0x98>` for 龘) accumulate until their character is whole, and
/// Traditional Chinese, emoji and rare CJK come out intact. Each step decodes only a short
/// window (the last emitted token as context, plus the pending ones) with the tokenizer's own
/// decoder, so the concatenated deltas equal `decode(all ids)` for any valid text, and memory
/// stays bounded however long the generation.
///
/// The decoder holds no reference to the tokenizer: pass the same one to every call.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (already emitted).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    skip_special: bool,
}

/// The part of `full` after `prefix`. `full` starts with `prefix` for everything a decoder
/// produces from valid text; if it does not, what follows the common prefix is given.
fn delta_after(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(full.len()));
    full.get(common..).unwrap_or_default().to_owned()
}

impl IncrementalDecoder {
    /// A decoder; with `skip_special`, special tokens (`<end_of_turn>`, `<bos>`...) give no text.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    /// Feeds one id; returns the new text, or `None` while a character is incomplete (or the
    /// token gives no text, like a skipped special token). An id the vocabulary lacks (a model
    /// whose output head has more rows than the tokenizer has ids can sample one) gives no
    /// text, as transformers decodes it, and never fails the sequence.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        if tokenizer.check_ids(&[id]).is_err() {
            return Ok(None);
        }
        self.ids.push(id);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = delta_after(&prefix, &full);
        // The newly emitted tokens become the context of the next window; older ids go.
        let keep_from = self.read_offset;
        self.ids.drain(..keep_from);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(Some(delta))
    }

    /// Flushes what is pending (an incomplete character comes out as U+FFFD) and resets the
    /// decoder for a new sequence.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let result = if self.read_offset < self.ids.len() {
            let prefix = tokenizer.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special,
            )?;
            let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
            let delta = delta_after(&prefix, &full);
            (!delta.is_empty()).then_some(delta)
        } else {
            None
        };
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::delta_after;

    #[test]
    fn delta_after_prefix() {
        assert_eq!(delta_after("ab", "abc"), "c");
        assert_eq!(delta_after("", "病患"), "病患");
    }

    #[test]
    fn delta_after_diverging_prefix_is_char_aligned() {
        assert_eq!(delta_after("病x", "病患"), "患");
        assert_eq!(delta_after("\u{FFFD}\u{FFFD}", "龘"), "龘");
    }
}

//! Rebuilding a `tokenizers::Tokenizer` from the tokenizer a GGUF file carries in its metadata.
//!
//! A Gemma GGUF says `tokenizer.ggml.model = "llama"`: a SentencePiece BPE vocabulary stored as
//! `tokens`, `scores` and `token_type` arrays, without merges. The Hugging Face `tokenizer.json`
//! of the same model is a `tokenizers` BPE model whose merges were generated from the
//! SentencePiece model by transformers' `generate_merges(vocab, scores)`: every split of every
//! piece into two pieces that are both in the vocabulary, ordered best first by the score of the
//! merged piece, then by the lengths of the left and right halves (longer first), ties kept in
//! vocabulary order. We do the same here, with two repairs that make the result identical to the
//! real `tokenizer.json` (all 514,906 merges, in the same order, for Gemma 3):
//!
//! 1. llama.cpp writes the pieces made of two or more spaces with real spaces (`"  "`), where
//!    SentencePiece and `tokenizer.json` spell them `"▁▁"`. We spell them back.
//! 2. llama.cpp writes a score of -1000 for control and user-defined pieces, where the
//!    SentencePiece model has 0. The score is the merge's sort key, so we restore 0. (With the
//!    GGUF's own scores the merges of whitespace runs such as `"▁▁▁▁"` sort last and long runs of
//!    spaces split differently; transformers' own GGUF loader, which sorts by file position
//!    instead, has the same defect.)
//!
//! Control pieces (type 3) become special added tokens and user-defined pieces (type 4) plain
//! added tokens, both matched whole in raw text as `tokenizer.json` does (`<start_of_turn>`,
//! `<bos>`, the `"\n\n"` runs...). The normalizer, pre-tokenizer, post-processor and decoder are
//! the ones Gemma's `tokenizer.json` uses.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::models::bpe::{BpeBuilder, Vocab};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Result, TokenizerError};

/// SentencePiece's whitespace marker.
const SPACE_MARKER: char = '\u{2581}';

/// llama.cpp's `token_type` values (`llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// What `from_gguf` needs besides the `tokenizers::Tokenizer` itself.
pub(crate) struct GgufTokenizer {
    pub(crate) inner: tokenizers::Tokenizer,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) add_bos_token: bool,
    pub(crate) chat_template: Option<String>,
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_array<'a>(content: &'a Content, key: &str) -> Result<Option<&'a Vec<Value>>> {
    meta(content, key)
        .map(|v| {
            v.to_vec()
                .map_err(|_| TokenizerError::Gguf(format!("{key} is not an array")))
        })
        .transpose()
}

fn meta_u32(content: &Content, key: &str) -> Result<Option<u32>> {
    meta(content, key)
        .map(|v| match v {
            Value::U8(x) => Ok(u32::from(*x)),
            Value::U16(x) => Ok(u32::from(*x)),
            Value::U32(x) => Ok(*x),
            Value::I32(x) => u32::try_from(*x).map_err(|_| negative(key)),
            Value::U64(x) => u32::try_from(*x).map_err(|_| too_large(key)),
            Value::I64(x) => u32::try_from(*x).map_err(|_| negative(key)),
            Value::I8(_)
            | Value::I16(_)
            | Value::F32(_)
            | Value::F64(_)
            | Value::Bool(_)
            | Value::String(_)
            | Value::Array(_) => Err(TokenizerError::Gguf(format!(
                "{key} is not an unsigned integer"
            ))),
        })
        .transpose()
}

fn negative(key: &str) -> TokenizerError {
    TokenizerError::Gguf(format!("{key} is negative"))
}

fn too_large(key: &str) -> TokenizerError {
    TokenizerError::Gguf(format!("{key} does not fit in 32 bits"))
}

fn meta_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    meta(content, key)
        .map(|v| {
            v.to_bool()
                .map_err(|_| TokenizerError::Gguf(format!("{key} is not a boolean")))
        })
        .transpose()
}

fn meta_string<'a>(content: &'a Content, key: &str) -> Result<Option<&'a String>> {
    meta(content, key)
        .map(|v| {
            v.to_string()
                .map_err(|_| TokenizerError::Gguf(format!("{key} is not a string")))
        })
        .transpose()
}

/// The pieces as `tokenizer.json` spells them: runs of real spaces become runs of `▁`.
fn respell(token: &str) -> String {
    if !token.is_empty() && token.chars().all(|c| c == ' ') {
        token.replace(' ', "\u{2581}")
    } else {
        token.to_owned()
    }
}

/// transformers' `generate_merges(vocab, vocab_scores)` for a SentencePiece BPE vocabulary:
/// every split `(left, right)` of every piece with both halves in the vocabulary, ordered by
/// `(score of the piece, chars in left, chars in right)` descending; equal keys keep the order
/// of the pieces in the vocabulary and, within one piece, `(id of left, id of right)`.
pub(crate) fn generate_merges(
    pieces: &[String],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    struct Candidate {
        left: u32,
        right: u32,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Candidate> = Vec::new();
    let mut local: Vec<Candidate> = Vec::new();
    for (piece, &score) in pieces.iter().zip(scores) {
        // Python compares -0.0 equal to 0.0 (Gemma's best normal piece scores -0.0, its
        // user-defined pieces 0): fold them so `total_cmp` agrees. NaN sorts last.
        let score = if score == 0.0 {
            0.0
        } else if score.is_nan() {
            f32::NEG_INFINITY
        } else {
            score
        };
        local.clear();
        let mut left_chars = 0;
        let total_chars = piece.chars().count();
        for (index, _) in piece.char_indices().skip(1) {
            left_chars += 1;
            let (left, right) = piece.split_at(index);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push(Candidate {
                    left: l,
                    right: r,
                    score,
                    left_chars,
                    right_chars: total_chars - left_chars,
                });
            }
        }
        local.sort_by_key(|c| (c.left, c.right));
        merges.append(&mut local);
    }
    // Stable: equal keys keep their order, like Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|c| {
            (
                pieces[c.left as usize].clone(),
                pieces[c.right as usize].clone(),
            )
        })
        .collect()
}

/// The vocabulary's pieces (respelled) and token types, after checking the model kind.
fn pieces_and_types(content: &Content) -> Result<(Vec<String>, Vec<i32>)> {
    let model = meta_string(content, "tokenizer.ggml.model")?
        .ok_or_else(|| TokenizerError::Gguf("tokenizer.ggml.model is missing".into()))?;
    if model != "llama" {
        return Err(TokenizerError::Gguf(format!(
            "tokenizer.ggml.model is {model:?}; only SentencePiece vocabularies (\"llama\", as \
             Gemma GGUFs have) are supported"
        )));
    }

    let tokens = meta_array(content, "tokenizer.ggml.tokens")?
        .ok_or_else(|| TokenizerError::Gguf("tokenizer.ggml.tokens is missing".into()))?;
    let n = tokens.len();
    if n == 0 || u32::try_from(n).is_err() {
        return Err(TokenizerError::Gguf(format!(
            "tokenizer.ggml.tokens has {n} entries"
        )));
    }
    let pieces = tokens
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(respell(s)),
            Value::U8(_)
            | Value::I8(_)
            | Value::U16(_)
            | Value::I16(_)
            | Value::U32(_)
            | Value::I32(_)
            | Value::U64(_)
            | Value::I64(_)
            | Value::F32(_)
            | Value::F64(_)
            | Value::Bool(_)
            | Value::Array(_) => Err(TokenizerError::Gguf(format!(
                "tokenizer.ggml.tokens[{i}] is not a string"
            ))),
        })
        .collect::<Result<Vec<String>>>()?;

    let types: Vec<i32> = match meta_array(content, "tokenizer.ggml.token_type")? {
        None => vec![1; n],
        Some(values) => {
            if values.len() != n {
                return Err(TokenizerError::Gguf(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    values.len()
                )));
            }
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.to_i32().map_err(|_| {
                        TokenizerError::Gguf(format!(
                            "tokenizer.ggml.token_type[{i}] is not an i32"
                        ))
                    })
                })
                .collect::<Result<_>>()?
        }
    };
    Ok((pieces, types))
}

/// Piece -> id; a piece twice is an error.
fn vocab(pieces: &[String]) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    for (id, piece) in pieces.iter().enumerate() {
        // `n` fits in u32 (checked above).
        let id = id as u32;
        if let Some(first) = vocab.insert(piece.clone(), id) {
            return Err(TokenizerError::Gguf(format!(
                "tokenizer.ggml.tokens holds the same piece at ids {first} and {id}"
            )));
        }
    }
    Ok(vocab)
}

/// The BPE merges: the file's, else recovered from the scores (see [`generate_merges`]).
fn merges(
    content: &Content,
    pieces: &[String],
    types: &[i32],
    vocab: &Vocab,
) -> Result<Vec<(String, String)>> {
    let n = pieces.len();
    Ok(match meta_array(content, "tokenizer.ggml.merges")? {
        Some(values) => values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v.to_string().map_err(|_| {
                    TokenizerError::Gguf(format!("tokenizer.ggml.merges[{i}] is not a string"))
                })?;
                let (l, r) = s.split_once(' ').ok_or_else(|| {
                    TokenizerError::Gguf(format!(
                        "tokenizer.ggml.merges[{i}] is not two pieces separated by a space"
                    ))
                })?;
                Ok((l.to_owned(), r.to_owned()))
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            let scores: Vec<f32> = match meta_array(content, "tokenizer.ggml.scores")? {
                // No scores: the file order is the merge order.
                None => (0..n).map(|i| -(i as f32)).collect(),
                Some(values) => {
                    if values.len() != n {
                        return Err(TokenizerError::Gguf(format!(
                            "tokenizer.ggml.scores has {} entries for {n} tokens",
                            values.len()
                        )));
                    }
                    values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            v.to_f32().map_err(|_| {
                                TokenizerError::Gguf(format!(
                                    "tokenizer.ggml.scores[{i}] is not an f32"
                                ))
                            })
                        })
                        .collect::<Result<_>>()?
                }
            };
            // SentencePiece gives control and user-defined pieces a score of 0; llama.cpp
            // writes -1000. The merge order of tokenizer.json follows SentencePiece.
            let scores: Vec<f32> = scores
                .iter()
                .zip(types)
                .map(|(&s, &t)| {
                    if t == TYPE_CONTROL || t == TYPE_USER_DEFINED {
                        0.0
                    } else {
                        s
                    }
                })
                .collect();
            generate_merges(pieces, &scores, vocab)
        }
    })
}

/// Normalizer, pre-tokenizer, decoder and (with BOS) post-processor of a SentencePiece
/// vocabulary, as transformers' Gemma `tokenizer.json` has them.
fn set_pipeline(
    inner: &mut tokenizers::Tokenizer,
    add_space_prefix: bool,
    bos: Option<(String, u32)>,
) -> Result<()> {
    let replace_space = Replace::new(" ", "\u{2581}")
        .map_err(|e| TokenizerError::Gguf(format!("cannot build the normalizer: {e}")))?;
    if add_space_prefix {
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPACE_MARKER.to_string())),
            NormalizerWrapper::Replace(replace_space),
        ])));
    } else {
        inner.with_normalizer(Some(replace_space));
    }
    let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(|e| TokenizerError::Gguf(format!("cannot build the pre-tokenizer: {e}")))?;
    inner.with_pre_tokenizer(Some(split));
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(
            Replace::new("\u{2581}", " ")
                .map_err(|e| TokenizerError::Gguf(format!("cannot build the decoder: {e}")))?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(StripDecoder::new(' ', 1, 0)));
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    if let Some((bos_piece, bos)) = bos {
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos_piece} $A"))
            .and_then(|b| b.try_pair(format!("{bos_piece} $A {bos_piece}:1 $B:1")))
            .map_err(|e| TokenizerError::Gguf(format!("cannot build the post-processor: {e}")))?
            .special_tokens(vec![(bos_piece, bos)])
            .build()
            .map_err(|e| TokenizerError::Gguf(format!("cannot build the post-processor: {e}")))?;
        inner.with_post_processor(Some(template));
    }
    Ok(())
}

pub(crate) fn build(content: &Content) -> Result<GgufTokenizer> {
    let (pieces, types) = pieces_and_types(content)?;
    let n = pieces.len();
    let vocab = vocab(&pieces)?;
    let merges = merges(content, &pieces, &types, &vocab)?;
    let token_id = |key: &str| -> Result<Option<u32>> {
        match meta_u32(content, key)? {
            Some(id) if (id as usize) < n => Ok(Some(id)),
            Some(id) => Err(TokenizerError::Gguf(format!(
                "{key} = {id} is outside the vocabulary of {n} tokens"
            ))),
            None => Ok(None),
        }
    };
    let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
    let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
    let eot_id = token_id("tokenizer.ggml.eot_token_id")?;
    let eom_id = token_id("tokenizer.ggml.eom_token_id")?;
    let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
    // llama.cpp's defaults for a SentencePiece vocabulary when the flags are absent.
    let add_bos_token = meta_bool(content, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_space_prefix = meta_bool(content, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let chat_template = meta_string(content, "tokenizer.chat_template")?.cloned();

    let has_byte_pieces = types.contains(&TYPE_BYTE);
    let unk_token = unk_id
        .map(|id| pieces[id as usize].clone())
        .or_else(|| vocab.contains_key("<unk>").then(|| "<unk>".to_owned()));
    let mut builder = BpeBuilder::new()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(has_byte_pieces);
    if let Some(unk) = unk_token {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| TokenizerError::Gguf(format!("cannot build the BPE model: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    let bos = bos_id
        .filter(|_| add_bos_token)
        .map(|id| (pieces[id as usize].clone(), id));
    set_pipeline(&mut inner, add_space_prefix, bos)?;

    let added = |wanted: i32, special: bool| -> Vec<AddedToken> {
        pieces
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == wanted)
            .map(|(p, _)| AddedToken::from(p.clone(), special).normalized(false))
            .collect()
    };
    let control = added(TYPE_CONTROL, true);
    let user_defined = added(TYPE_USER_DEFINED, false);
    inner.add_special_tokens(&control);
    inner.add_tokens(&user_defined);

    let mut eos_ids = Vec::new();
    for id in [eos_id, eot_id, eom_id].into_iter().flatten() {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    crate::tokenizer::add_gemma_stop_tokens(&inner, &mut eos_ids);

    tracing::debug!(
        tokens = n,
        control = control.len(),
        user_defined = user_defined.len(),
        add_space_prefix,
        "built tokenizer from GGUF metadata"
    );
    Ok(GgufTokenizer {
        inner,
        bos_id,
        eos_ids,
        add_bos_token,
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merges(pieces: &[&str], scores: &[f32]) -> Vec<(String, String)> {
        let pieces: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        let vocab: Vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        generate_merges(&pieces, scores, &vocab)
    }

    fn pair(l: &str, r: &str) -> (String, String) {
        (l.to_owned(), r.to_owned())
    }

    #[test]
    fn merges_sort_by_score_then_longer_halves() {
        let got = merges(
            &["a", "b", "c", "ab", "bc", "abc"],
            &[0.0, 0.0, 0.0, -1.0, -2.0, -0.5],
        );
        assert_eq!(
            got,
            vec![
                pair("ab", "c"),
                pair("a", "bc"),
                pair("a", "b"),
                pair("b", "c")
            ]
        );
    }

    #[test]
    fn negative_zero_ties_with_zero_and_keeps_vocabulary_order() {
        // "xy" (score -0.0) comes before "zz" (score 0.0) in the vocabulary: as in Python,
        // the tie keeps that order.
        let got = merges(&["x", "y", "z", "xy", "zz"], &[-9.0, -9.0, -9.0, -0.0, 0.0]);
        assert_eq!(got, vec![pair("x", "y"), pair("z", "z")]);
    }

    #[test]
    fn respell_only_touches_space_runs() {
        assert_eq!(respell("  "), "\u{2581}\u{2581}");
        assert_eq!(respell(" a"), " a");
        assert_eq!(respell(""), "");
        assert_eq!(respell("\n\n"), "\n\n");
    }
}

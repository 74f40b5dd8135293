//! A pre-flight walk over the element structure of a DICOM file, before dicom-rs reads it.
//!
//! dicom-rs reserves and zero-fills each element's declared length before it reads the value,
//! so a 300-byte file that declares a 4 GB element costs 4 GB of memory. This walk follows the
//! same token structure dicom-rs's reader does (explicit or implicit VR, either byte order,
//! sequences and items of defined or undefined length, encapsulated pixel data) and checks
//! that every length that will be allocated fits in the bytes that remain. Values are skipped,
//! never read: nothing here sees patient data.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

const UNDEFINED: u32 = u32::MAX;
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// The end of the file meta group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The Transfer Syntax UID (0002,0010), trailing padding removed.
    pub(crate) transfer_syntax: String,
    /// Offset (in the bytes after the preamble) where the data set starts.
    pub(crate) dataset_start: usize,
}

/// Walks the file meta group of `body` (the bytes from "DICM" on) as dicom-rs reads it:
/// explicit VR little endian, a group length (0002,0000) first, then elements until that many
/// bytes are consumed, whatever their group (libFuzzer found that stopping at the first
/// element of another group, as the standard implies, lets the two disagree on where the data
/// set starts, and dicom-rs then allocated 2 GB for a 702-byte file).
pub(crate) fn walk_meta(body: &[u8]) -> Result<Meta, String> {
    if !body.starts_with(b"DICM") {
        return Err("missing the \"DICM\" prefix".into());
    }
    let truncated = |pos: usize| format!("file meta group truncated at byte {}", pos + 128);
    let mut pos = 4;
    let first = read_header(body, pos, Encoding::ExplicitLe).ok_or_else(|| truncated(pos))?;
    if first.tag != Tag(0x0002, 0x0000) || first.len != 4 {
        return Err("the file meta group does not start with its group length (0002,0000)".into());
    }
    pos += first.header_len;
    let group_length = read_u32(body, pos, false).ok_or_else(|| truncated(pos))?;
    pos += 4;
    let mut consumed = 0u32;
    let mut transfer_syntax = None;
    while consumed < group_length {
        let header = read_header(body, pos, Encoding::ExplicitLe).ok_or_else(|| truncated(pos))?;
        if header.len == UNDEFINED {
            return Err(format!(
                "undefined length in the file meta group at byte {}",
                pos + 128
            ));
        }
        let start = pos + header.header_len;
        let end = checked_end(body, start, header.len, header.tag)?;
        if header.tag == Tag(0x0002, 0x0010) {
            // Trimmed as dicom-rs trims it (any trailing whitespace or NUL: libFuzzer found a
            // form feed that made the two read the data set in different encodings); only
            // ASCII, so the two cannot decode its bytes differently either.
            let uid = std::str::from_utf8(&body[start..end])
                .ok()
                .filter(|u| u.is_ascii())
                .ok_or("the Transfer Syntax UID (0002,0010) is not ASCII")?;
            transfer_syntax = Some(
                uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
                    .to_string(),
            );
        }
        consumed = consumed
            .saturating_add(header.header_len as u32)
            .saturating_add(header.len);
        pos = end;
    }
    let transfer_syntax =
        transfer_syntax.ok_or("the file meta group has no Transfer Syntax UID (0002,0010)")?;
    Ok(Meta {
        transfer_syntax,
        dataset_start: pos,
    })
}

/// Structure limits checked by [`walk_dataset`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkLimits {
    /// Deepest nesting of sequences.
    pub(crate) max_depth: u32,
    /// Most element headers (items and delimiters included).
    pub(crate) max_elements: u64,
}

/// Why a walk refused the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WalkError {
    /// A declared length does not fit, or the structure is broken.
    Corrupt(String),
    /// Sequences nest deeper than [`WalkLimits::max_depth`].
    TooDeep,
    /// More elements than [`WalkLimits::max_elements`].
    TooManyElements,
}

/// An open sequence or item: where it ends (`None`: undefined length, ended by a delimiter).
#[derive(Debug, Clone, Copy)]
struct Open {
    end: Option<usize>,
    sequence: bool,
}

/// Walks the data set of `body` from `start` in the given transfer syntax: every declared
/// length fits, sequences nest at most `limits.max_depth` deep, at most `limits.max_elements`
/// headers. Iterative (an explicit stack), so no input can exhaust the thread's stack here.
pub(crate) fn walk_dataset(
    body: &[u8],
    start: usize,
    transfer_syntax: &str,
    limits: WalkLimits,
) -> Result<(), WalkError> {
    let encoding = match transfer_syntax {
        IMPLICIT_VR_LE => Encoding::ImplicitLe,
        EXPLICIT_VR_BE => Encoding::ExplicitBe,
        _ => Encoding::ExplicitLe,
    };
    let mut pos = start;
    let mut in_pixel_sequence = false;
    let mut open: Vec<Open> = Vec::new();
    let mut depth = 0u32;
    let mut elements = 0u64;
    // A trailing partial header is where dicom-rs stops reading; nothing is allocated for it.
    while let Some(header) = read_header(body, pos, encoding) {
        // Close the defined-length sequences and items this element is past.
        while let Some(&Open {
            end: Some(end),
            sequence,
        }) = open.last()
        {
            if pos < end {
                break;
            }
            open.pop();
            depth -= u32::from(sequence);
        }
        elements += 1;
        if elements > limits.max_elements {
            return Err(WalkError::TooManyElements);
        }
        pos += header.header_len;
        let tag = header.tag;
        let defined = (header.len != UNDEFINED).then_some(header.len);
        // dicom-rs reads an (FFFE,xxxx) header as an item or a delimiter only where it
        // expects one: inside a sequence (or encapsulated pixel data), between items; an item
        // delimiter anywhere. Elsewhere it is an element like any other, its value allocated
        // at its declared length (libFuzzer found a sequence delimiter at the top level
        // declaring 4 GB).
        let between_items = in_pixel_sequence || open.last().is_some_and(|o| o.sequence);
        if tag.group() == 0xFFFE && (between_items || tag.element() == 0xE00D) {
            match tag.element() {
                // An item: a fragment of encapsulated pixel data is read as bytes; the content
                // of a data set item is walked.
                0xE000 if in_pixel_sequence => {
                    pos = checked_end(body, pos, header.len, tag).map_err(WalkError::Corrupt)?;
                }
                0xE000 => {
                    let end = match defined {
                        Some(len) => {
                            Some(checked_end(body, pos, len, tag).map_err(WalkError::Corrupt)?)
                        }
                        None => None,
                    };
                    open.push(Open {
                        end,
                        sequence: false,
                    });
                }
                // Item delimitation: closes the innermost undefined-length item.
                0xE00D => close(&mut open, &mut depth, false),
                // Sequence delimitation: ends encapsulated pixel data, or closes the innermost
                // undefined-length sequence.
                0xE0DD if in_pixel_sequence => in_pixel_sequence = false,
                0xE0DD => close(&mut open, &mut depth, true),
                // Any other (FFFE,xxxx) tag dicom-rs reads as an element whose value is
                // allocated at its declared length (found by libFuzzer: 4 bytes declaring
                // 3.7 GB).
                _ => {
                    let len = defined.ok_or_else(|| {
                        WalkError::Corrupt(format!(
                            "element ({:04X},{:04X}) at byte {} has an undefined length",
                            tag.group(),
                            tag.element(),
                            pos + 128 - header.header_len,
                        ))
                    })?;
                    pos = checked_end(body, pos, len, tag).map_err(WalkError::Corrupt)?;
                }
            }
            continue;
        }
        if tag == Tag(0x7FE0, 0x0010) && defined.is_none() {
            // Encapsulated pixel data: its items are fragments.
            in_pixel_sequence = true;
            continue;
        }
        if header.vr == VR::SQ || defined.is_none() {
            let end = match defined {
                Some(len) => Some(checked_end(body, pos, len, tag).map_err(WalkError::Corrupt)?),
                None => None,
            };
            depth += 1;
            if depth > limits.max_depth {
                return Err(WalkError::TooDeep);
            }
            open.push(Open {
                end,
                sequence: true,
            });
            continue;
        }
        checked_end(body, pos, header.len, tag).map_err(WalkError::Corrupt)?;
        pos += consumed(header.vr, header.len);
    }
    Ok(())
}

/// The bytes dicom-rs's reader takes for a value of `len` declared bytes: numbers are read
/// whole (`len / size` of them), so a length that is not a multiple of the number's size
/// leaves its tail to be read as the next header (libFuzzer found the two walks drifting
/// apart there, and dicom-rs then allocating 4 GB for an 894-byte file).
fn consumed(vr: VR, len: u32) -> usize {
    let size: u32 = match vr {
        VR::US | VR::OW | VR::SS => 2,
        VR::AT | VR::UL | VR::OL | VR::SL | VR::FL | VR::OF => 4,
        VR::FD | VR::OD | VR::SV | VR::OV | VR::UV => 8,
        _ => 1,
    };
    (len - len % size) as usize
}

/// Closes the innermost open container of undefined length (and any defined-length ones
/// left inside it) when it is of the delimiter's kind; a stray delimiter is ignored, as
/// dicom-rs does.
fn close(open: &mut Vec<Open>, depth: &mut u32, sequence: bool) {
    if let Some(i) = open.iter().rposition(|o| o.end.is_none())
        && open[i].sequence == sequence
    {
        for o in open.drain(i..) {
            *depth -= u32::from(o.sequence);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    ExplicitLe,
    ExplicitBe,
    ImplicitLe,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    tag: Tag,
    vr: VR,
    len: u32,
    header_len: usize,
}

fn checked_end(body: &[u8], start: usize, len: u32, tag: Tag) -> Result<usize, String> {
    let remaining = body.len().saturating_sub(start);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > remaining {
        return Err(format!(
            "element ({:04X},{:04X}) at byte {} declares {len} bytes but only {remaining} remain",
            tag.group(),
            tag.element(),
            start + 128,
        ));
    }
    Ok(start + len)
}

fn read_u16(bytes: &[u8], pos: usize, big_endian: bool) -> Option<u16> {
    let b: [u8; 2] = bytes.get(pos..pos.checked_add(2)?)?.try_into().ok()?;
    Some(if big_endian {
        u16::from_be_bytes(b)
    } else {
        u16::from_le_bytes(b)
    })
}

fn read_u32(bytes: &[u8], pos: usize, big_endian: bool) -> Option<u32> {
    let b: [u8; 4] = bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    })
}

/// Reads an element header as dicom-rs's decoders do; `None` when the bytes end first.
fn read_header(bytes: &[u8], pos: usize, encoding: Encoding) -> Option<Header> {
    let be = encoding == Encoding::ExplicitBe;
    let group = read_u16(bytes, pos, be)?;
    let element = read_u16(bytes, pos + 2, be)?;
    let tag = Tag(group, element);
    if group == 0xFFFE {
        return Some(Header {
            tag,
            vr: VR::UN,
            len: read_u32(bytes, pos + 4, be)?,
            header_len: 8,
        });
    }
    match encoding {
        Encoding::ImplicitLe => {
            let len = read_u32(bytes, pos + 4, false)?;
            let vr = if tag == Tag(0x7FE0, 0x0010) || (group >> 8 == 0x60 && element == 0x3000) {
                VR::OW
            } else {
                StandardDataDictionary
                    .by_tag(tag)
                    .map(|entry| entry.vr().relaxed())
                    .unwrap_or(VR::UN)
            };
            Some(Header {
                tag,
                vr,
                len,
                header_len: 8,
            })
        }
        Encoding::ExplicitLe | Encoding::ExplicitBe => {
            let vr_bytes: [u8; 2] = bytes.get(pos + 4..pos + 6)?.try_into().ok()?;
            let vr = VR::from_binary(vr_bytes).unwrap_or(VR::UN);
            if short_length(vr) {
                Some(Header {
                    tag,
                    vr,
                    len: u32::from(read_u16(bytes, pos + 6, be)?),
                    header_len: 8,
                })
            } else {
                Some(Header {
                    tag,
                    vr,
                    len: read_u32(bytes, pos + 8, be)?,
                    header_len: 12,
                })
            }
        }
    }
}

/// VRs whose explicit-VR length field is 16 bits (PS3.5 7.1.2).
fn short_length(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::AT
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::TM
            | VR::UI
            | VR::UL
            | VR::US
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit_le(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if short_length(VR::from_binary(*vr).unwrap()) {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn meta_and_dataset_lengths() {
        let ts = explicit_le((2, 0x10), b"UI", b"1.2.840.10008.1.2.1\0");
        let mut body = b"DICM".to_vec();
        body.extend(explicit_le((2, 0), b"UL", &(ts.len() as u32).to_le_bytes()));
        body.extend(&ts);
        let meta = walk_meta(&body).unwrap();
        assert_eq!(meta.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(meta.dataset_start, body.len());
        // The group length decides where the meta group ends, as in dicom-rs: an element of
        // another group inside it belongs to it, one after it to the data set.
        let other = explicit_le((0x10, 0x10), b"PN", b"ANON");
        let mut longer = b"DICM".to_vec();
        longer.extend(explicit_le(
            (2, 0),
            b"UL",
            &((ts.len() + other.len()) as u32).to_le_bytes(),
        ));
        longer.extend(&ts);
        longer.extend(&other);
        assert_eq!(walk_meta(&longer).unwrap().dataset_start, longer.len());
        // Without the group length, or cut inside the group, it is refused.
        let mut bare = b"DICM".to_vec();
        bare.extend(&ts);
        assert!(walk_meta(&bare).unwrap_err().contains("(0002,0000)"));
        // Trailing whitespace of any kind is trimmed, as dicom-rs trims it.
        let ff = explicit_le((2, 0x10), b"UI", b"1.2.840.10008.1.2\0\0\x0c\0");
        let mut padded = b"DICM".to_vec();
        padded.extend(explicit_le((2, 0), b"UL", &(ff.len() as u32).to_le_bytes()));
        padded.extend(&ff);
        assert_eq!(walk_meta(&padded).unwrap().transfer_syntax, IMPLICIT_VR_LE);
        assert!(walk_meta(&longer[..longer.len() - 3]).is_err());
        body.extend(explicit_le((0x10, 0x10), b"PN", b"ANON"));
        assert!(walk_dataset(&body, meta.dataset_start, &meta.transfer_syntax, LIMITS).is_ok());
        // An OB element that declares 4 GB in a short file.
        let mut bomb = body.clone();
        bomb.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        bomb.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        bomb.extend_from_slice(&[0; 16]);
        let e = walk_dataset(&bomb, meta.dataset_start, &meta.transfer_syntax, LIMITS).unwrap_err();
        let WalkError::Corrupt(e) = e else {
            panic!("{e:?}")
        };
        assert!(e.contains("(7FE0,0010)") && e.contains("4294967280"), "{e}");
        // An item-group tag that is neither an item nor a delimiter, declaring 3.7 GB: dicom-rs
        // reads it as an element (the libFuzzer finding in fuzz/corpus/decode_image).
        let mut odd = body.clone();
        odd.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0x01]);
        odd.extend_from_slice(&3_759_144_960u32.to_le_bytes());
        odd.extend_from_slice(&[0; 4]);
        let e = walk_dataset(&odd, meta.dataset_start, &meta.transfer_syntax, LIMITS).unwrap_err();
        assert!(
            matches!(&e, WalkError::Corrupt(m) if m.contains("(FFFE,01DD)")),
            "{e:?}"
        );
        // Such an element of a length that fits is skipped, as dicom-rs reads past it.
        let mut fits = body.clone();
        fits.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0x01, 4, 0, 0, 0, 1, 2, 3, 4]);
        fits.extend(explicit_le((0x10, 0x20), b"LO", b"ID"));
        assert!(walk_dataset(&fits, meta.dataset_start, &meta.transfer_syntax, LIMITS).is_ok());
        // A sequence delimiter outside any sequence is an element to dicom-rs: its declared
        // 4 GB would be allocated.
        let mut stray = body.clone();
        stray.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0]);
        stray.extend_from_slice(&0xFFFF_FF00u32.to_le_bytes());
        stray.extend_from_slice(&[0; 8]);
        let e = walk_dataset(&stray, meta.dataset_start, &meta.transfer_syntax, LIMITS);
        assert!(
            matches!(&e, Err(WalkError::Corrupt(m)) if m.contains("(FFFE,E0DD)")),
            "{e:?}"
        );
        // A UL of 7 bytes: dicom-rs reads one number (4 bytes) and the next header starts
        // 3 bytes early, where this one declares 4 GB.
        let mut drift = body.clone();
        drift.extend_from_slice(&[0x08, 0x00, 0x00, 0x01, b'U', b'L', 7, 0]);
        drift.extend_from_slice(&[0; 4]);
        drift.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'O', b'B', 0, 0]);
        drift.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let e = walk_dataset(&drift, meta.dataset_start, &meta.transfer_syntax, LIMITS);
        assert!(
            matches!(&e, Err(WalkError::Corrupt(m)) if m.contains("4294967280")),
            "{e:?}"
        );
    }

    #[test]
    fn every_decodable_transfer_syntax_is_walked_in_its_own_encoding() {
        use dicom_encoding::transfer_syntax::{Codec, Endianness};
        use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
        // The walk knows three encodings of the data set (implicit VR is the one standard
        // syntax that uses it). A transfer syntax dicom-rs decodes that is none of them (a
        // deflated data set) would let it check other bytes than dicom-rs reads: none may be
        // decodable in our build.
        for ts in TransferSyntaxRegistry.iter().filter(|t| t.can_decode_all()) {
            assert!(!matches!(ts.codec(), Codec::Dataset(_)), "{}", ts.uid());
            let uid = ts.uid().trim_end_matches('\0');
            assert_eq!(
                uid == EXPLICIT_VR_BE,
                ts.endianness() == Endianness::Big,
                "{uid}"
            );
        }
    }

    const LIMITS: WalkLimits = WalkLimits {
        max_depth: 8,
        max_elements: 1000,
    };

    /// `levels` sequences, each holding one item holding the next, of undefined lengths
    /// (`defined`: of defined lengths), around one element.
    fn nested(levels: usize, defined: bool) -> Vec<u8> {
        let leaf = explicit_le((0x10, 0x10), b"PN", b"ANON");
        if defined {
            let mut inner = leaf;
            for _ in 0..levels {
                let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
                item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
                item.extend_from_slice(&inner);
                inner = explicit_le((0x0040, 0xA730), b"SQ", &item);
            }
            return inner;
        }
        // Undefined lengths: the leaf between the openings and the closings.
        let mut out = crate::hostile::nested_dicom_sequences(levels);
        let middle = levels * 20;
        out.splice(middle..middle, leaf);
        out
    }

    #[test]
    fn nesting_depth_and_element_count_are_capped() {
        const TS: &str = "1.2.840.10008.1.2.1";
        for defined in [false, true] {
            for (levels, ok) in [(8, true), (9, false), (10_000, false)] {
                let body = nested(levels, defined);
                let got = walk_dataset(&body, 0, TS, LIMITS);
                assert_eq!(
                    got.is_ok(),
                    ok,
                    "{levels} levels, defined {defined}: {got:?}"
                );
                if !ok {
                    assert_eq!(got, Err(WalkError::TooDeep));
                }
            }
            // Siblings close their levels: 100 sequences of depth 8 one after another pass.
            let body: Vec<u8> = (0..100).flat_map(|_| nested(8, defined)).collect();
            assert_eq!(
                walk_dataset(
                    &body,
                    0,
                    TS,
                    WalkLimits {
                        max_elements: 10_000,
                        ..LIMITS
                    }
                ),
                Ok(())
            );
        }
        let many: Vec<u8> = (0..1001)
            .flat_map(|_| explicit_le((0x10, 0x10), b"PN", b"ANON"))
            .collect();
        assert_eq!(
            walk_dataset(&many, 0, TS, LIMITS),
            Err(WalkError::TooManyElements)
        );
        assert_eq!(
            walk_dataset(&many[..many.len() - 12], 0, TS, LIMITS),
            Ok(())
        );
    }
}

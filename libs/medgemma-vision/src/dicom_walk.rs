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

/// Walks the file meta group of `body` (the bytes from "DICM" on): always explicit VR little
/// endian, elements of group 0002.
pub(crate) fn walk_meta(body: &[u8]) -> Result<Meta, String> {
    if !body.starts_with(b"DICM") {
        return Err("missing the \"DICM\" prefix".into());
    }
    let mut pos = 4;
    let mut transfer_syntax = None;
    while let Some(group) = read_u16(body, pos, false) {
        if group != 0x0002 {
            break;
        }
        let header = read_header(body, pos, Encoding::ExplicitLe)
            .ok_or_else(|| format!("file meta group truncated at byte {}", pos + 128))?;
        if header.len == UNDEFINED {
            return Err(format!(
                "undefined length in the file meta group at byte {}",
                pos + 128
            ));
        }
        let start = pos + header.header_len;
        let end = checked_end(body, start, header.len, header.tag)?;
        if header.tag == Tag(0x0002, 0x0010) {
            let uid = String::from_utf8_lossy(&body[start..end]);
            transfer_syntax = Some(uid.trim_end_matches(['\0', ' ']).to_string());
        }
        pos = end;
    }
    let transfer_syntax =
        transfer_syntax.ok_or("the file meta group has no Transfer Syntax UID (0002,0010)")?;
    Ok(Meta {
        transfer_syntax,
        dataset_start: pos,
    })
}

/// Walks the data set of `body` from `start` in the given transfer syntax and checks that every
/// declared length fits.
pub(crate) fn walk_dataset(body: &[u8], start: usize, transfer_syntax: &str) -> Result<(), String> {
    let encoding = match transfer_syntax {
        IMPLICIT_VR_LE => Encoding::ImplicitLe,
        EXPLICIT_VR_BE => Encoding::ExplicitBe,
        _ => Encoding::ExplicitLe,
    };
    let mut pos = start;
    let mut in_pixel_sequence = false;
    // A trailing partial header is where dicom-rs stops reading; nothing is allocated for it.
    while let Some(header) = read_header(body, pos, encoding) {
        pos += header.header_len;
        let tag = header.tag;
        if tag.group() == 0xFFFE {
            match tag.element() {
                // An item: a fragment of encapsulated pixel data is read as bytes; the content
                // of a data set item is walked.
                0xE000 if in_pixel_sequence => pos = checked_end(body, pos, header.len, tag)?,
                0xE000 if header.len != UNDEFINED => {
                    checked_end(body, pos, header.len, tag)?;
                }
                0xE0DD => in_pixel_sequence = false,
                _ => {}
            }
            continue;
        }
        if header.len == UNDEFINED {
            // Encapsulated pixel data, or a sequence of undefined length: walk the items.
            if tag == Tag(0x7FE0, 0x0010) {
                in_pixel_sequence = true;
            }
            continue;
        }
        if header.vr == VR::SQ {
            checked_end(body, pos, header.len, tag)?;
            continue;
        }
        pos = checked_end(body, pos, header.len, tag)?;
    }
    Ok(())
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
        let mut body = b"DICM".to_vec();
        body.extend(explicit_le((2, 0x10), b"UI", b"1.2.840.10008.1.2.1\0"));
        let meta = walk_meta(&body).unwrap();
        assert_eq!(meta.transfer_syntax, "1.2.840.10008.1.2.1");
        body.extend(explicit_le((0x10, 0x10), b"PN", b"ANON"));
        assert!(walk_dataset(&body, meta.dataset_start, &meta.transfer_syntax).is_ok());
        // An OB element that declares 4 GB in a short file.
        let mut bomb = body.clone();
        bomb.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        bomb.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        bomb.extend_from_slice(&[0; 16]);
        let e = walk_dataset(&bomb, meta.dataset_start, &meta.transfer_syntax).unwrap_err();
        assert!(e.contains("(7FE0,0010)") && e.contains("4294967280"), "{e}");
    }
}

//! Hostile inputs for tests, fuzz seeds and attack runs: well-formed bytes that once took a
//! service down. Never used on a request path.

/// `levels` Content Sequences (0040,A730) of undefined length, each holding one item holding
/// the next, in explicit VR little endian: the element bytes only (put them in a data set, e.g.
/// with [`insert_before_pixel_data`]). 10,000 levels overflowed dicom-rs's recursive parser on
/// a 2 MiB thread stack.
pub fn nested_dicom_sequences(levels: usize) -> Vec<u8> {
    const SEQUENCE: [u8; 12] = [
        0x40, 0x00, 0x30, 0xA7, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    const ITEM: [u8; 8] = [0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF];
    const ITEM_END: [u8; 8] = [0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0];
    const SEQUENCE_END: [u8; 8] = [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0];
    let mut out = Vec::with_capacity(levels * 36);
    for _ in 0..levels {
        out.extend_from_slice(&SEQUENCE);
        out.extend_from_slice(&ITEM);
    }
    for _ in 0..levels {
        out.extend_from_slice(&ITEM_END);
        out.extend_from_slice(&SEQUENCE_END);
    }
    out
}

/// `dicom` (a Part 10 file) with `elements` inserted just before its Pixel Data (7FE0,0010);
/// `None` if it has none.
pub fn insert_before_pixel_data(dicom: &[u8], elements: &[u8]) -> Option<Vec<u8>> {
    let at = dicom
        .windows(4)
        .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])?;
    let mut out = dicom.to_vec();
    out.splice(at..at, elements.iter().copied());
    Some(out)
}

/// The PNG chunk checksum (CRC-32, ISO-HDLC).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that is only a signature, an IHDR claiming `width` x `height` RGB, and IEND: a
/// decompression bomb's header (a decoder that trusts it allocates width x height x 3 bytes).
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IEND", &[]);
    out
}

/// `dicom` (explicit VR little endian) with its Rows (0028,0010) and Columns (0028,0011) set
/// to `rows` x `cols`, the pixel data unchanged: an RLE or JPEG 2000 file so rewritten is a
/// bomb (a few kB declaring gigapixels). `None` without both elements.
pub fn dicom_with_dimensions(dicom: &[u8], rows: u16, cols: u16) -> Option<Vec<u8>> {
    let mut out = dicom.to_vec();
    for (tag, value) in [
        ([0x28, 0x00, 0x10, 0x00], rows),
        ([0x28, 0x00, 0x11, 0x00], cols),
    ] {
        let header = [&tag[..], b"US\x02\x00"].concat();
        let at = out.windows(header.len()).position(|w| w == header)? + header.len();
        out[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
    Some(out)
}

/// `dicom` with the first JPEG 2000 codestream's SIZ (image size) rewritten to `width` x
/// `height`, the DICOM header unchanged: the codestream claims far more samples than the file
/// says. `None` without a codestream.
pub fn j2k_codestream_claiming(dicom: &[u8], width: u32, height: u32) -> Option<Vec<u8>> {
    // SOC (FF4F) then SIZ (FF51): marker, Lsiz, Rsiz, then Xsiz and Ysiz (big endian).
    let at = dicom
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let mut out = dicom.to_vec();
    let x = at + 8;
    out.get(x + 8)?;
    out[x..x + 4].copy_from_slice(&width.to_be_bytes());
    out[x + 4..x + 8].copy_from_slice(&height.to_be_bytes());
    Some(out)
}

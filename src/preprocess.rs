//! Image bytes -> the encoder's input tensor, as docs/bundle.md describes.
//!
//! Size limits are checked from the image header, before any pixel buffer exists, so
//! a small file that claims to be enormous costs nothing. Decoding and resizing are
//! CPU-heavy: callers run this on a blocking thread, not on the async runtime.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
use ndarray::Array3;

use crate::bundle::{ImageSpec, ResizeFilter};

/// Formats the service accepts; others are refused even if the decoder could read them.
pub const SUPPORTED_FORMATS: &[ImageFormat] = &[
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width * height accepted.
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Most bytes a decoder may allocate for one image.
    pub max_alloc_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: 40_000_000,
            max_side: 16_384,
            max_alloc_bytes: 512 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image is empty")]
    Empty,
    #[error("unrecognised or unsupported image format (send JPEG, PNG, WebP, GIF or BMP)")]
    UnknownFormat,
    #[error("cannot decode the image: {0}")]
    Undecodable(String),
    #[error(
        "{}; at most {max_side} pixels a side and {max_pixels} pixels in all are accepted",
        size_of(*width, *height)
    )]
    TooLarge {
        /// 0 (with `height`) when a decoder refused the size without reporting it.
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("the image exceeds the decoder's memory limit")]
    TooMuchMemory,
}

/// The start of the `TooLarge` message: the image's size where it is known.
fn size_of(width: u32, height: u32) -> String {
    if width == 0 || height == 0 {
        "the image is larger than the limits allow".into()
    } else {
        format!("the image is {width}x{height}")
    }
}

/// Bytes of memory a decode of `bytes` will hold at its peak, from the header alone:
/// the decoded frame in its own pixel format (16-bit RGBA takes 8 bytes a pixel), a
/// second frame when the EXIF orientation rotates or flips it, the RGB8 copy that
/// [`to_tensor`] resizes, and for a JPEG the copy of the file its decoder makes
/// before it starts. `None` when the decode will fail at once, and cheaply: the
/// header cannot be read, or it is over `limits` (so that an image claiming 50000 x
/// 50000 is refused without waiting for the budget it would need).
pub fn decode_memory_estimate(bytes: &[u8], limits: &ImageLimits) -> Option<u64> {
    let input_copy = if image::guess_format(bytes).ok() == Some(ImageFormat::Jpeg) {
        bytes.len() as u64
    } else {
        0
    };
    let mut decoder = open_decoder(bytes, limits).ok()?;
    let frame = decoder.total_bytes();
    if frame > limits.max_alloc_bytes {
        return None;
    }
    let (width, height) = decoder.dimensions();
    let transformed = decoder
        .orientation()
        .is_ok_and(|o| o != image::metadata::Orientation::NoTransforms);
    let frames = if transformed { 2 } else { 1 };
    let rgb8 = u64::from(width) * u64::from(height) * 3;
    Some(
        frame
            .saturating_mul(frames)
            .saturating_add(rgb8)
            .saturating_add(input_copy),
    )
}

/// Reads the header of `bytes`: a decoder of a supported format whose dimensions are
/// within `limits`, with no pixel allocated yet.
fn open_decoder<'a>(
    bytes: &'a [u8],
    limits: &ImageLimits,
) -> Result<impl ImageDecoder + 'a, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) if jpeg_ends_early(bytes) => {
            return Err(PreprocessError::Undecodable(
                "the JPEG data ends before its end-of-image marker (a truncated file?)".into(),
            ));
        }
        Some(f) if SUPPORTED_FORMATS.contains(&f) => {}
        _ => return Err(PreprocessError::UnknownFormat),
    }
    // No side limits for the decoder: it would refuse an oversized header without
    // saying its size. `check_size` below refuses it with the size.
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);

    // The decoder reads only the header here; its dimensions decide before any pixels
    // are allocated.
    let decoder = reader
        .into_decoder()
        .map_err(|e| map_error(e, (0, 0), limits))?;
    let (width, height) = decoder.dimensions();
    check_size(width, height, limits)?;
    Ok(decoder)
}

/// Whether JPEG `bytes` stop before the end-of-image marker that follows the image
/// data. The JPEG decoder fills in what a cut-off file lacks (grey, or the last row
/// repeated) without an error, and a truncated upload would be captioned as if it were
/// the picture; the other formats' decoders refuse truncated data themselves. Bytes
/// after the marker (some cameras append data) are allowed. A stream whose segments
/// cannot be followed to its first scan is left to the decoder to judge.
fn jpeg_ends_early(bytes: &[u8]) -> bool {
    let Some(scan) = jpeg_first_scan_data(bytes) else {
        return false;
    };
    // In scan data a 0xFF byte is followed only by 0x00 (stuffing) or a marker, so the
    // end-of-image marker cannot occur by chance. Searched from the end: that is where
    // it is in a whole file.
    !bytes[scan..].windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

/// Where the data of a JPEG stream's first scan starts: after the segments from the
/// start-of-image marker to the start-of-scan segment (so that the end-of-image
/// marker of a thumbnail in the EXIF data is not taken for the image's).
fn jpeg_first_scan_data(bytes: &[u8]) -> Option<usize> {
    let mut at = 2; // after the start-of-image marker
    while at + 1 < bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        match bytes[at + 1] {
            0xFF => at += 1,               // fill byte before a marker
            0x01 | 0xD0..=0xD7 => at += 2, // markers without a length
            0xD8 | 0xD9 => return None,    // a second start, or an end before any scan
            marker => {
                let length = bytes.get(at + 2..at + 4)?;
                let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
                at += 2 + length;
                if marker == 0xDA {
                    return (at <= bytes.len()).then_some(at);
                }
            }
        }
    }
    None
}

/// Decodes `bytes` into an image with its EXIF orientation applied.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    let mut decoder = open_decoder(bytes, limits)?;
    let (width, height) = decoder.dimensions();
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| map_error(e, (width, height), limits))?;
    img.apply_orientation(orientation);
    Ok(img)
}

fn check_size(width: u32, height: u32, limits: &ImageLimits) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::Undecodable(
            "the image has no pixels".into(),
        ));
    }
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// `(width, height)`: the image's size, (0, 0) where not yet known.
fn map_error(e: ImageError, (width, height): (u32, u32), limits: &ImageLimits) -> PreprocessError {
    match e {
        ImageError::Limits(l) => match l.kind() {
            image::error::LimitErrorKind::DimensionError => PreprocessError::TooLarge {
                width,
                height,
                max_side: limits.max_side,
                max_pixels: limits.max_pixels,
            },
            _ => PreprocessError::TooMuchMemory,
        },
        ImageError::Unsupported(_) => PreprocessError::UnknownFormat,
        other => PreprocessError::Undecodable(other.to_string()),
    }
}

fn filter_type(f: ResizeFilter) -> FilterType {
    match f {
        ResizeFilter::Nearest => FilterType::Nearest,
        ResizeFilter::Bilinear => FilterType::Triangle,
        // PIL's bicubic is the Catmull-Rom kernel (a = -0.5).
        ResizeFilter::Bicubic => FilterType::CatmullRom,
        ResizeFilter::Lanczos3 => FilterType::Lanczos3,
    }
}

/// RGB8 (alpha dropped, grey replicated, 16-bit scaled), resized to `size x size`,
/// scaled to [0, 1], normalized with the manifest's mean/std, laid out CHW.
pub fn to_tensor(img: &DynamicImage, spec: &ImageSpec) -> Array3<f32> {
    let size = spec.size;
    let rgb = img.to_rgb8();
    let resized = if rgb.width() == size && rgb.height() == size {
        rgb
    } else {
        image::imageops::resize(&rgb, size, size, filter_type(spec.resize_filter))
    };
    let s = size as usize;
    let mut out = Array3::<f32>::zeros((3, s, s));
    for (x, y, px) in resized.enumerate_pixels() {
        for c in 0..3 {
            let v = f32::from(px.0[c]) / 255.0;
            out[[c, y as usize, x as usize]] = (v - spec.mean[c]) / spec.std[c];
        }
    }
    out
}

/// Bytes -> normalized CHW tensor.
pub fn preprocess(
    bytes: &[u8],
    spec: &ImageSpec,
    limits: &ImageLimits,
) -> Result<Array3<f32>, PreprocessError> {
    let img = decode(bytes, limits)?;
    Ok(to_tensor(&img, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn spec(size: u32) -> ImageSpec {
        ImageSpec {
            size,
            resize_filter: ResizeFilter::Bicubic,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
        }
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    fn red_left_blue_right(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, _| {
            if x < w / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        }))
    }

    #[test]
    fn every_format_decodes() {
        let img = red_left_blue_right(20, 10);
        for f in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Bmp,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ] {
            let bytes = encode(&img, f);
            let t = preprocess(&bytes, &spec(8), &ImageLimits::default())
                .unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(t.dim(), (3, 8, 8));
            // Left is red: R high, B low (lossy formats allowed some slack).
            assert!(t[[0, 4, 0]] > 0.8 && t[[2, 4, 0]] < -0.8, "{f:?}");
            assert!(t[[2, 4, 7]] > 0.8 && t[[0, 4, 7]] < -0.8, "{f:?}");
        }
    }

    #[test]
    fn grey_alpha_and_16_bit_become_rgb() {
        let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(4, 4, Luma([255u8])));
        let t = preprocess(
            &encode(&grey, ImageFormat::Png),
            &spec(4),
            &ImageLimits::default(),
        )
        .unwrap();
        assert!(t.iter().all(|&v| (v - 1.0).abs() < 1e-6));

        // Alpha is dropped, colour kept as is: fully transparent red stays red.
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(4, 4, Rgba([255u8, 0, 0, 0])));
        let t = preprocess(
            &encode(&rgba, ImageFormat::Png),
            &spec(4),
            &ImageLimits::default(),
        )
        .unwrap();
        assert!((t[[0, 0, 0]] - 1.0).abs() < 1e-6 && (t[[1, 0, 0]] + 1.0).abs() < 1e-6);

        let la16 = DynamicImage::ImageLumaA16(ImageBuffer::from_pixel(4, 4, LumaA([65535u16, 10])));
        let t = preprocess(
            &encode(&la16, ImageFormat::Png),
            &spec(4),
            &ImageLimits::default(),
        )
        .unwrap();
        assert!((t[[2, 1, 1]] - 1.0).abs() < 1e-6);

        let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(4, 4, Rgb([0u16, 65535, 0])));
        let t = preprocess(
            &encode(&rgb16, ImageFormat::Png),
            &spec(4),
            &ImageLimits::default(),
        )
        .unwrap();
        assert!((t[[1, 3, 3]] - 1.0).abs() < 1e-6 && (t[[0, 3, 3]] + 1.0).abs() < 1e-6);
    }

    /// A PNG header claiming `w x h` followed by a few bytes of pixel data: a small
    /// file that would need a huge buffer.
    fn lying_png(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32(&ihdr);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc.to_be_bytes());
        let idat = b"IDAT\x78\x9c\x03\x00";
        png.extend_from_slice(&4u32.to_be_bytes());
        png.extend_from_slice(idat);
        png.extend_from_slice(&crc32(idat).to_be_bytes());
        png
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn huge_dimensions_are_refused_from_the_header() {
        let png = lying_png(50_000, 50_000);
        assert!(png.len() < 100);
        let err = decode(&png, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err:?}");

        // Within the side limit but over the pixel budget.
        let limits = ImageLimits {
            max_pixels: 1000,
            max_side: 16_384,
            max_alloc_bytes: 1 << 30,
        };
        let err = decode(&lying_png(100, 100), &limits).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooLarge {
                    width: 100,
                    height: 100,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn decode_memory_is_estimated_from_the_header() {
        let limits = ImageLimits::default();
        let rgba16 = DynamicImage::ImageRgba16(ImageBuffer::new(300, 200));
        let png = encode(&rgba16, ImageFormat::Png);
        assert_eq!(
            decode_memory_estimate(&png, &limits),
            Some(300 * 200 * (8 + 3))
        );
        let rgb8 = DynamicImage::ImageRgb8(ImageBuffer::new(300, 200));
        // A JPEG's decoder copies the file first.
        let jpeg = encode(&rgb8, ImageFormat::Jpeg);
        assert_eq!(
            decode_memory_estimate(&jpeg, &limits),
            Some(300 * 200 * (3 + 3) + jpeg.len() as u64)
        );
        // A rotation makes a second frame.
        let rotated = jpeg_with_orientation(&rgb8, 6);
        assert_eq!(
            decode_memory_estimate(&rotated, &limits),
            Some(300 * 200 * (3 + 3 + 3) + rotated.len() as u64)
        );
        // A header within the limits is taken at its word, even when the body holds
        // less (the decode fails then); one over them needs no memory: it is refused.
        let lying = lying_png(4_000, 4_000);
        assert_eq!(
            decode_memory_estimate(&lying, &limits),
            Some(4_000 * 4_000 * (3 + 3))
        );
        assert_eq!(
            decode_memory_estimate(&lying_png(40_000, 40_000), &limits),
            None
        );
        assert_eq!(decode_memory_estimate(b"not an image", &limits), None);
        assert_eq!(decode_memory_estimate(b"", &limits), None);
    }

    #[test]
    fn too_large_messages_give_the_real_size() {
        // A real image, too wide: 20000x10 is only 200000 pixels.
        let wide = encode(&DynamicImage::new_luma8(20_000, 10), ImageFormat::Png);
        let msg = decode(&wide, &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("the image is 20000x10;"), "{msg}");
        assert!(msg.contains("at most 16384 pixels a side"), "{msg}");

        let msg = decode(&lying_png(50_000, 50_000), &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("the image is 50000x50000;"), "{msg}");

        // A size the decoder did not report is not claimed.
        let unknown = map_error(
            ImageError::Limits(image::error::LimitError::from_kind(
                image::error::LimitErrorKind::DimensionError,
            )),
            (0, 0),
            &ImageLimits::default(),
        )
        .to_string();
        assert!(
            unknown.starts_with("the image is larger than the limits allow;"),
            "{unknown}"
        );
        assert!(!unknown.contains("0x0"), "{unknown}");
    }

    #[test]
    fn garbage_and_unknown_formats_are_refused() {
        assert_eq!(
            decode(b"", &ImageLimits::default()).unwrap_err(),
            PreprocessError::Empty
        );
        assert_eq!(
            decode(b"hello, this is not an image", &ImageLimits::default()).unwrap_err(),
            PreprocessError::UnknownFormat
        );
        let mut truncated = encode(&red_left_blue_right(64, 64), ImageFormat::Png);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(
            decode(&truncated, &ImageLimits::default()).unwrap_err(),
            PreprocessError::Undecodable(_)
        ));
    }

    #[test]
    fn truncated_jpegs_are_refused_and_trailing_bytes_allowed() {
        let refused_as_truncated = |jpeg: &[u8]| {
            let limits = ImageLimits::default();
            assert_eq!(decode_memory_estimate(jpeg, &limits), None);
            match decode(jpeg, &limits) {
                Err(PreprocessError::Undecodable(m)) => m.contains("truncated"),
                _ => false,
            }
        };
        let img = red_left_blue_right(64, 48);
        let plain = encode(&img, ImageFormat::Jpeg);
        // An EXIF segment with an end-of-image marker in it, as a thumbnail has.
        let mut thumbnail = plain[..2].to_vec();
        thumbnail.extend_from_slice(&[0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD8, 0xFF, 0xD9]);
        thumbnail.extend_from_slice(&plain[2..]);
        for jpeg in [plain, thumbnail, jpeg_with_orientation(&img, 6)] {
            assert!(decode(&jpeg, &ImageLimits::default()).is_ok());
            let mut appended = jpeg.clone();
            appended.extend_from_slice(b"data some cameras append");
            assert!(decode(&appended, &ImageLimits::default()).is_ok());
            // Cut inside the image data, where the decoder alone would fill in the rest.
            let scan = jpeg_first_scan_data(&jpeg).unwrap();
            for keep in [jpeg.len() - 2, (scan + jpeg.len()) / 2, scan + 1] {
                assert!(
                    refused_as_truncated(&jpeg[..keep]),
                    "{keep} of {} bytes",
                    jpeg.len()
                );
            }
        }
    }

    /// A JPEG whose EXIF says "rotate 90 degrees clockwise" (orientation 6).
    fn jpeg_with_orientation(img: &DynamicImage, orientation: u16) -> Vec<u8> {
        let jpeg = encode(img, ImageFormat::Jpeg);
        // TIFF header (big endian), one IFD entry: 0x0112 SHORT 1 = orientation.
        let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes());
        tiff.extend_from_slice(&0x0112u16.to_be_bytes());
        tiff.extend_from_slice(&3u16.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes());
        let mut app1 = b"Exif\x00\x00".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 20 wide, 10 high, red left; rotated 90 clockwise it is 10 wide, 20 high, red on top.
        let jpeg = jpeg_with_orientation(&red_left_blue_right(20, 10), 6);
        let img = decode(&jpeg, &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (10, 20));
        let rgb = img.to_rgb8();
        assert!(rgb.get_pixel(5, 2).0[0] > 200, "top should be red");
        assert!(rgb.get_pixel(5, 17).0[2] > 200, "bottom should be blue");
    }

    #[test]
    fn normalization_is_chw_with_mean_and_std() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(2, 2, Rgb([0u8, 51, 255])));
        let s = ImageSpec {
            size: 2,
            resize_filter: ResizeFilter::Nearest,
            mean: [0.1, 0.2, 0.3],
            std: [0.5, 0.25, 2.0],
        };
        let t = to_tensor(&img, &s);
        assert!((t[[0, 1, 1]] - (0.0 - 0.1) / 0.5).abs() < 1e-6);
        assert!((t[[1, 0, 1]] - (0.2 - 0.2) / 0.25).abs() < 1e-6);
        assert!((t[[2, 1, 0]] - (1.0 - 0.3) / 2.0).abs() < 1e-6);
    }
}

//! The IDX format of the MNIST distribution, plain or gzip-compressed.
//!
//! An image file starts with the big-endian `u32`s 2051, image count, rows and columns, then
//! one unsigned byte per pixel; a label file starts with 2049 and the label count, then one
//! byte per label. The same reader takes the bundled 10,000-image subset and the full
//! 60,000-image training files.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::data::{input_error, Dataset};

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;
/// Every gzip stream starts with these two bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads a file, decompressing it when it is gzip.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .map_err(|error| input_error(format!("cannot read {}: {error}", path.display())))?;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut bytes)
        .map_err(|error| {
            input_error(format!(
                "{} is not a valid gzip file: {error}",
                path.display()
            ))
        })?;
    Ok(bytes)
}

/// Reads the big-endian `u32` header field `index`.
fn header_field(bytes: &[u8], index: usize, path: &Path) -> Result<u32> {
    let offset = 4 * index;
    let field = bytes.get(offset..offset + 4).ok_or_else(|| {
        input_error(format!(
            "{} is too short for an IDX header ({} bytes)",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(u32::from_be_bytes([field[0], field[1], field[2], field[3]]))
}

/// Checks the magic number in the first header field.
fn expect_magic(bytes: &[u8], path: &Path, magic: u32) -> Result<()> {
    let found = header_field(bytes, 0, path)?;
    if found != magic {
        let kind = if magic == IMAGES_MAGIC {
            "image"
        } else {
            "label"
        };
        return Err(input_error(format!(
            "{} is not an IDX {kind} file: magic number {found}, expected {magic}",
            path.display()
        )));
    }
    Ok(())
}

/// Checks that the file is as long as its header announces.
fn expect_length(bytes: &[u8], path: &Path, header_fields: usize, items: usize) -> Result<()> {
    let expected = items.saturating_add(4 * header_fields);
    if bytes.len() != expected {
        return Err(input_error(format!(
            "{} has {} bytes, its header announces {expected}; the file is truncated or corrupt",
            path.display(),
            bytes.len()
        )));
    }
    Ok(())
}

/// Returns the label file that belongs to an image file named like the MNIST distribution's
/// (`...images-idx3-ubyte...` beside `...labels-idx1-ubyte...`).
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name.replacen("images-idx3-ubyte", "labels-idx1-ubyte", 1);
    (labels != name).then(|| images.with_file_name(labels))
}

/// Loads an IDX image file and its label file as a data set of 10 classes, with raw pixel
/// values 0 to 255 as features.
///
/// # Errors
///
/// An input error naming the file for a missing file, invalid gzip, wrong magic number,
/// a length that does not match the header, different image and label counts, or a label
/// above 9.
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset> {
    let image_bytes = read_maybe_gzip(images)?;
    expect_magic(&image_bytes, images, IMAGES_MAGIC)?;
    let count = header_field(&image_bytes, 1, images)? as usize;
    let rows = header_field(&image_bytes, 2, images)? as usize;
    let columns = header_field(&image_bytes, 3, images)? as usize;
    let pixels = rows.saturating_mul(columns);
    expect_length(&image_bytes, images, 4, count.saturating_mul(pixels))?;

    let label_bytes = read_maybe_gzip(labels)?;
    expect_magic(&label_bytes, labels, LABELS_MAGIC)?;
    let label_count = header_field(&label_bytes, 1, labels)? as usize;
    expect_length(&label_bytes, labels, 2, label_count)?;
    if label_count != count {
        return Err(input_error(format!(
            "{} has {count} images but {} has {label_count} labels",
            images.display(),
            labels.display()
        )));
    }

    let classes = 10;
    let mut dataset = Dataset {
        features: image_bytes[16..]
            .iter()
            .map(|&pixel| f64::from(pixel))
            .collect(),
        labels: Vec::with_capacity(count),
        feature_count: pixels,
        classes,
    };
    for (index, &label) in label_bytes[8..].iter().enumerate() {
        if label as usize >= classes {
            return Err(input_error(format!(
                "{}: label {label} of item {index} is not a digit from 0 to 9",
                labels.display()
            )));
        }
        dataset.labels.push(label as usize);
    }
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(count: u32, rows: u32, columns: u32, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for field in [IMAGES_MAGIC, count, rows, columns] {
            bytes.extend_from_slice(&field.to_be_bytes());
        }
        bytes.extend_from_slice(pixels);
        bytes
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for field in [LABELS_MAGIC, labels.len() as u32] {
            bytes.extend_from_slice(&field.to_be_bytes());
        }
        bytes.extend_from_slice(labels);
        bytes
    }

    fn write_temp(bytes: &[u8], gzip: bool) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        if gzip {
            let mut encoder =
                flate2::write::GzEncoder::new(&mut file, flate2::Compression::default());
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap();
        } else {
            file.write_all(bytes).unwrap();
        }
        file
    }

    #[test]
    fn reads_plain_and_gzip() {
        let images = write_temp(&idx_images(2, 1, 2, &[0, 255, 7, 8]), true);
        let labels = write_temp(&idx_labels(&[3, 9]), false);
        let data = load_idx(images.path(), labels.path()).unwrap();
        assert_eq!(data.feature_count, 2);
        assert_eq!(data.labels, vec![3, 9]);
        assert_eq!(data.row(0), &[0.0, 255.0]);
    }

    #[test]
    fn truncated_images_rejected() {
        let images = write_temp(&idx_images(2, 1, 2, &[0, 255, 7]), false);
        let labels = write_temp(&idx_labels(&[3, 9]), false);
        let message = load_idx(images.path(), labels.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("header announces 20"), "{message}");
    }

    #[test]
    fn swapped_files_rejected() {
        let images = write_temp(&idx_images(1, 1, 1, &[0]), false);
        let labels = write_temp(&idx_labels(&[3]), false);
        let message = load_idx(labels.path(), images.path())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("magic number 2049, expected 2051"),
            "{message}"
        );
    }

    #[test]
    fn count_mismatch_rejected() {
        let images = write_temp(&idx_images(1, 1, 1, &[0]), false);
        let labels = write_temp(&idx_labels(&[3, 4]), false);
        let message = load_idx(images.path(), labels.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("1 images but"), "{message}");
    }

    #[test]
    fn label_above_nine_rejected() {
        let images = write_temp(&idx_images(1, 1, 1, &[0]), false);
        let labels = write_temp(&idx_labels(&[10]), false);
        let message = load_idx(images.path(), labels.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("label 10"), "{message}");
    }

    #[test]
    fn labels_path_follows_mnist_names() {
        let images = Path::new("/data/train-images-idx3-ubyte.gz");
        let labels = labels_path_for(images).unwrap();
        assert_eq!(labels, Path::new("/data/train-labels-idx1-ubyte.gz"));
        assert_eq!(labels_path_for(Path::new("/data/digits.csv")), None);
    }
}

//! Labelled data sets: the CSV loader and the train/test split.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;

/// An error caused by the user's input (a file or an option), reported with exit status 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Builds an [`InputError`] wrapped in `anyhow`.
pub fn input_error(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(message.into()))
}

/// Rows of features with one class label each.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Row-major features, `len() * features` values.
    pub features: Vec<f64>,
    /// Class label of each row.
    pub labels: Vec<usize>,
    /// Features per row.
    pub feature_count: usize,
    /// Number of classes; every label is below it.
    pub classes: usize,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set has no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features of row `row`.
    pub fn row(&self, row: usize) -> &[f64] {
        &self.features[row * self.feature_count..(row + 1) * self.feature_count]
    }

    /// Largest absolute feature value.
    pub fn max_feature(&self) -> f64 {
        self.features
            .iter()
            .fold(0.0, |max, x| f64::max(max, x.abs()))
    }

    /// Splits into rows `..at` and `at..`; `at = 0` leaves every row in the second part.
    pub fn split(&self, at: usize) -> Result<(Dataset, Dataset)> {
        if at >= self.len() {
            return Err(input_error(format!(
                "--split {at} is invalid: the data set has {} row(s), and the split must be \
                 below that to leave test rows",
                self.len()
            )));
        }
        Ok((self.rows(0..at), self.rows(at..self.len())))
    }

    /// Returns the first `count` rows (every row when there are fewer).
    pub fn head(&self, count: usize) -> Dataset {
        self.rows(0..count.min(self.len()))
    }

    fn rows(&self, range: std::ops::Range<usize>) -> Dataset {
        let width = self.feature_count;
        Dataset {
            features: self.features[range.start * width..range.end * width].to_vec(),
            labels: self.labels[range].to_vec(),
            feature_count: width,
            classes: self.classes,
        }
    }
}

/// Loads a CSV file without a header: every column but the last is a feature, the last is
/// an integer class label in `0..classes`.
///
/// # Errors
///
/// An [`InputError`] naming the file, the line and the value for a missing or empty file, a
/// row with a different column count, a field that is not a number, a NaN or infinite
/// feature, and a label that is not an integer in range.
pub fn load_csv(path: &Path, classes: usize) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(|error| {
        input_error(format!("cannot open data file {}: {error}", path.display()))
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(file);
    let mut data = Dataset {
        features: Vec::new(),
        labels: Vec::new(),
        feature_count: 0,
        classes,
    };
    let place = |line: u64| format!("{}:{line}", path.display());

    for record in reader.records() {
        let record = record.map_err(|error| {
            input_error(format!("cannot read data file {}: {error}", path.display()))
        })?;
        let line = record.position().map_or(0, |position| position.line());
        if record.len() < 2 {
            return Err(input_error(format!(
                "{}: expected at least 2 columns (features, then a label), found {}",
                place(line),
                record.len()
            )));
        }
        if data.labels.is_empty() {
            data.feature_count = record.len() - 1;
        } else if record.len() != data.feature_count + 1 {
            return Err(input_error(format!(
                "{}: expected {} columns like the first row, found {}",
                place(line),
                data.feature_count + 1,
                record.len()
            )));
        }

        for (column, field) in record.iter().take(data.feature_count).enumerate() {
            let value: f64 = field.parse().map_err(|_| {
                input_error(format!(
                    "{}: column {} is '{field}', which is not a number",
                    place(line),
                    column + 1
                ))
            })?;
            if !value.is_finite() {
                return Err(input_error(format!(
                    "{}: column {} is '{field}'; features must be finite numbers",
                    place(line),
                    column + 1
                )));
            }
            data.features.push(value);
        }

        let field = &record[data.feature_count];
        let label = match field.parse::<usize>() {
            Ok(label) if label < classes => label,
            Ok(_) => {
                return Err(input_error(format!(
                    "{}: label '{field}' in the last column is not below the number of \
                     classes {classes}; set --classes to the number of classes",
                    place(line)
                )))
            }
            Err(_) => {
                return Err(input_error(format!(
                    "{}: label '{field}' in the last column is invalid: labels must be whole \
                     numbers from 0 to {}",
                    place(line),
                    classes - 1
                )))
            }
        };
        data.labels.push(label);
    }

    if data.is_empty() {
        return Err(input_error(format!(
            "data file {} has no rows",
            path.display()
        )));
    }
    Ok(data)
}

/// Paths of the bundled 10,000-image MNIST subset (images, labels).
pub fn default_mnist_paths() -> (PathBuf, PathBuf) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    (
        data.join("mnist10k-images-idx3-ubyte.gz"),
        data.join("mnist10k-labels-idx1-ubyte.gz"),
    )
}

/// Path of the bundled digits data set, for running from the repository.
pub fn default_digits_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits.csv")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(text: &str) -> Result<Dataset> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        load_csv(file.path(), 10)
    }

    fn message(result: Result<Dataset>) -> String {
        let error = result.unwrap_err();
        assert!(
            error.downcast_ref::<InputError>().is_some(),
            "not an input error: {error}"
        );
        error.to_string()
    }

    #[test]
    fn loads_features_and_labels() {
        let data = load_text("1,2,3\n4,5,9\n").unwrap();
        assert_eq!(data.feature_count, 2);
        assert_eq!(data.labels, vec![3, 9]);
        assert_eq!(data.row(1), &[4.0, 5.0]);
    }

    #[test]
    fn wrong_column_count_names_line() {
        let text = message(load_text("1,2,3\n4,5\n"));
        assert!(text.contains(":2: expected 3 columns"), "{text}");
    }

    #[test]
    fn non_numeric_field_names_value() {
        let text = message(load_text("1,2,3\n4,x,5\n"));
        assert!(text.contains(":2: column 2 is 'x'"), "{text}");
    }

    #[test]
    fn nan_feature_rejected() {
        let text = message(load_text("1,NaN,3\n"));
        assert!(text.contains("column 2 is 'NaN'"), "{text}");
    }

    #[test]
    fn label_out_of_range_rejected() {
        let text = message(load_text("1,2,10\n"));
        assert!(text.contains("label '10'"), "{text}");
    }

    #[test]
    fn missing_file_names_path() {
        let text = message(load_csv(Path::new("/nonexistent/digits.csv"), 10));
        assert!(text.contains("/nonexistent/digits.csv"), "{text}");
    }

    #[test]
    fn empty_file_rejected() {
        let text = message(load_text(""));
        assert!(text.contains("has no rows"), "{text}");
    }

    #[test]
    fn split_checks_bounds() {
        let data = load_text("1,2,3\n4,5,6\n").unwrap();
        assert!(data.split(2).is_err());
        assert_eq!(data.split(0).unwrap().1.len(), 2);
        let (train, test) = data.split(1).unwrap();
        assert_eq!(train.len(), 1);
        assert_eq!(test.labels, vec![6]);
    }
}

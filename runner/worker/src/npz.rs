//! Reading `.npz` archives (numpy's `np.savez` and `np.savez_compressed`) without panicking.
//!
//! Every array is read with its header checked against its bytes; what numpy writes is read as
//! numpy reads it, including arrays in Fortran order (what numpy writes for a transposed array
//! or one made with `order="F"`), which are returned in C order. Anything else (a big-endian
//! array, Python objects, a header that does not parse, fewer bytes than the shape needs) is an
//! error that says which array and what to do; no input makes this module panic (the `npz`
//! fuzz target in `make fuzz` checks it).

use std::io::Read;

/// The element types xlab reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::F16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F16 => tch::Kind::Half,
            Dtype::F32 => tch::Kind::Float,
            Dtype::F64 => tch::Kind::Double,
            Dtype::I8 => tch::Kind::Int8,
            Dtype::I16 => tch::Kind::Int16,
            Dtype::I32 => tch::Kind::Int,
            Dtype::I64 => tch::Kind::Int64,
            Dtype::U8 => tch::Kind::Uint8,
            Dtype::Bool => tch::Kind::Bool,
        }
    }
}

/// One array of an archive, in C order (little-endian bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Array {
    /// The array as a tensor of its own element type.
    pub fn to_tensor(&self) -> Result<tch::Tensor, String> {
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        tch::Tensor::f_from_data_size(&self.data, &shape, self.dtype.kind())
            .map_err(|e| format!("array `{}`: {}", self.name, e.to_string().lines().next().unwrap_or_default()))
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";
/// No array xlab reads has more dimensions; numpy's own limit is 64.
const MAX_DIMS: usize = 32;

/// Reads every array of the archive at `path`.
pub fn read(path: &str) -> Result<Vec<Array>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    read_from(std::io::BufReader::new(file))
}

/// Reads every array of an archive.
pub fn read_from<R: Read + std::io::Seek>(r: R) -> Result<Vec<Array>, String> {
    let mut zip =
        zip::ZipArchive::new(r).map_err(|e| format!("not an .npz archive (save it with numpy's `np.savez`): {e}"))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("entry {i} of the archive is unreadable: {e}"))?;
        let name = entry.name().strip_suffix(".npy").unwrap_or(entry.name()).to_string();
        // The archive says how large the entry is; never trust it beyond the bytes that come.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 26) as usize);
        entry.read_to_end(&mut bytes).map_err(|e| format!("array `{name}` is unreadable: {e}"))?;
        let (dtype, shape, fortran, offset) = header(&bytes).map_err(|m| format!("array `{name}`: {m}"))?;
        let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let need = count.and_then(|n| n.checked_mul(dtype.size()));
        let data = &bytes[offset..];
        match need {
            Some(need) if need == data.len() => {}
            Some(need) => {
                return Err(format!(
                    "array `{name}`: its header says shape {shape:?} ({need} bytes of data), but it holds {} bytes; \
                     is the file truncated?",
                    data.len()
                ))
            }
            None => return Err(format!("array `{name}`: its shape {shape:?} is too large")),
        }
        let data = if fortran && shape.len() > 1 { to_c_order(data, &shape, dtype.size()) } else { data.to_vec() };
        out.push(Array { name, dtype, shape, data });
    }
    Ok(out)
}

/// Parses an `.npy` header: the element type, the shape, whether the data is in Fortran order,
/// and where the data starts.
fn header(b: &[u8]) -> Result<(Dtype, Vec<usize>, bool, usize), String> {
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err("not a numpy array (no .npy header)".into());
    }
    let (len, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unknown .npy format version {v}")),
    };
    let end = start.checked_add(len).filter(|&e| e <= b.len()).ok_or("its header is truncated")?;
    let text = std::str::from_utf8(&b[start..end]).map_err(|_| "its header is not text")?;
    let descr = dict_value(text, "descr").ok_or("its header has no `descr`")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = dtype(descr)?;
    let fortran = match dict_value(text, "fortran_order").map(str::trim) {
        Some("True") => true,
        Some("False") => false,
        _ => return Err("its header has no valid `fortran_order`".into()),
    };
    let shape_text = dict_value(text, "shape").ok_or("its header has no `shape`")?;
    let inner = shape_text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("its shape `{shape_text}` is not a tuple"))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("its shape `{shape_text}` is not a tuple of sizes"))
        })
        .collect::<Result<_, _>>()?;
    if shape.len() > MAX_DIMS {
        return Err(format!("it has {} dimensions; xlab reads at most {MAX_DIMS}", shape.len()));
    }
    Ok((dtype, shape, fortran, end))
}

/// The text of `key`'s value in a header's Python dict literal: up to the next top-level comma.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(&format!("'{key}'")).or_else(|| text.find(&format!("\"{key}\"")))?;
    let rest = &text[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?;
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => return Some(&rest[..i]),
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

fn dtype(descr: &str) -> Result<Dtype, String> {
    let (order, code) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let t = match code {
        "f2" => Dtype::F16,
        "f4" => Dtype::F32,
        "f8" => Dtype::F64,
        "i1" => Dtype::I8,
        "i2" => Dtype::I16,
        "i4" => Dtype::I32,
        "i8" => Dtype::I64,
        "u1" => Dtype::U8,
        "b1" => Dtype::Bool,
        "O" => return Err("it holds Python objects (dtype object); save an array of numbers".into()),
        other => {
            return Err(format!(
                "its element type `{other}` is not one xlab reads (float16/32/64, int8/16/32/64, uint8, bool); \
                 convert it with `.astype(np.float32)` or `.astype(np.int64)`"
            ))
        }
    };
    if order == '>' && t.size() > 1 {
        return Err("it is big-endian; save it little-endian with `.astype(arr.dtype.newbyteorder('<'))`".into());
    }
    Ok(t)
}

/// Fortran-order bytes (first index fastest) to C order (last index fastest).
fn to_c_order(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    // Strides of the Fortran layout, in elements.
    let mut fstride = vec![1usize; shape.len()];
    for d in 1..shape.len() {
        fstride[d] = fstride[d - 1] * shape[d - 1];
    }
    let mut idx = vec![0usize; shape.len()];
    for c in 0..n {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out[c * size..(c + 1) * size].copy_from_slice(&data[f * size..(f + 1) * size]);
        // The next C-order index: the last dimension moves fastest.
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let f = if fortran { "True" } else { "False" };
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    fn archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, bytes) in entries {
            z.start_file(format!("{name}.npy"), zip::write::FileOptions::default()).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
        drop(z);
        buf.into_inner()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn fortran_order_reads_as_numpy_does() {
        // np.arange(6, dtype=np.float32).reshape(2, 3).T is 3×2 [[0, 3], [1, 4], [2, 5]] and is
        // saved in Fortran order as its memory, 0 1 2 3 4 5.
        let a = archive(&[("x", npy("<f4", true, "(3, 2)", &f32s(&[0., 1., 2., 3., 4., 5.])))]);
        let arrays = read_from(std::io::Cursor::new(a)).unwrap();
        assert_eq!(arrays[0].shape, vec![3, 2]);
        assert_eq!(arrays[0].data, f32s(&[0., 3., 1., 4., 2., 5.]));
        // Three dimensions: shape (2, 2, 2) in Fortran order, element (i, j, k) at i + 2j + 4k.
        let mem: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let a = archive(&[("x", npy("<f4", true, "(2, 2, 2)", &f32s(&mem)))]);
        let c: Vec<f32> = (0..8).map(|c| ((c >> 2) + 2 * ((c >> 1) & 1) + 4 * (c & 1)) as f32).collect();
        assert_eq!(read_from(std::io::Cursor::new(a)).unwrap()[0].data, f32s(&c));
    }

    #[test]
    fn bad_arrays_are_refused_with_what_to_do() {
        let cases: [(Vec<u8>, &str); 6] = [
            (npy("<f4", false, "(3,)", &f32s(&[1.0, 2.0])), "holds 8 bytes; is the file truncated?"),
            (npy(">f4", false, "(1,)", &f32s(&[1.0])), "big-endian"),
            (npy("|O", false, "(1,)", &[0; 8]), "Python objects"),
            (npy("<c8", false, "(1,)", &[0; 8]), "`c8` is not one xlab reads"),
            (npy("<f4", false, "(99999999999, 99999999999, 99999999999)", &[]), "is too large"),
            (b"\x93NUMPY\x01\x00\xff\xff{".to_vec(), "header is truncated"),
        ];
        for (bytes, want) in cases {
            let err = read_from(std::io::Cursor::new(archive(&[("x", bytes)]))).unwrap_err();
            assert!(err.contains("array `x`") && err.contains(want), "{err}");
        }
        assert!(read_from(std::io::Cursor::new(b"PK\x03\x04 nope".to_vec())).unwrap_err().contains("not an .npz"));
    }

    /// The reader never panics, whatever the archive holds (`make fuzz` runs it longer).
    #[test]
    fn fuzz_npz_archives() {
        let dict: &[&[u8]] = &[
            b"\x93NUMPY\x01\x00",
            b"'descr': '<f4'",
            b"'descr': '<i8'",
            b"'descr': '|O'",
            b"'fortran_order': True",
            b"'shape': (",
            b"2, 3",
            b"0,",
            b")",
            b"PK\x03\x04",
            b"PK\x01\x02",
            b"PK\x05\x06",
            b"x.npy",
            b"y.npy",
        ];
        // Each input twice: as the archive itself (the zip layer), and as one array's bytes in a
        // well-formed archive (the .npy layer, which the zip's checksums would otherwise guard
        // from most mutations).
        let read = |archive: Vec<u8>| -> Result<(), String> {
            for a in &read_from(std::io::Cursor::new(archive))? {
                let _ = a.to_tensor()?;
            }
            Ok(())
        };
        xlab_fuzz::check("npz", dict, 20_000, |bytes| {
            let outer = read(bytes.to_vec());
            let inner = read(archive(&[("x", bytes.to_vec())]));
            match (outer, inner) {
                (Ok(()), _) => Ok(()),
                (Err(a), Err(b)) => Err(format!("{a} | {b}")),
                (Err(_), Ok(())) => Err("an array".into()),
            }
        });
    }

    #[test]
    fn zero_rows_read_as_an_empty_array() {
        let a = archive(&[("x", npy("<f4", false, "(0, 5)", &[]))]);
        let arrays = read_from(std::io::Cursor::new(a)).unwrap();
        assert_eq!(arrays[0].shape, vec![0, 5]);
        assert_eq!(arrays[0].to_tensor().unwrap().size(), vec![0, 5]);
    }
}

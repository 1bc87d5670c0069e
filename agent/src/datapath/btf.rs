//! Offsets of kernel structure members, read from the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`).
//!
//! The fast path's sk_msg program reads two fields no BPF context exposes: a socket's
//! `sk_user_data` and a psock's `msg_tot_len` ([`warden_common::FastpathKernel`]). Their offsets
//! differ between kernel builds, so the agent looks them up here at start and hands them to the
//! program, which is what a CO-RE relocation would do at load time.
//!
//! Only what that needs: the named struct's direct members, byte-aligned and not bitfields. The
//! file is mapped (privately and read-only: the kernel refuses a shared mapping of its BTF), not
//! read, and unmapped when [`KernelBtf`] is dropped, so looking up two offsets leaves no heap
//! behind (the agent's idle memory is a target). Kernels before 6.16 cannot map it; there it is
//! read.

use std::{fs::File, ops::Range, path::Path};

use memmap2::{Mmap, MmapOptions};

/// The kernel's BTF, as the kernel exposes it.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;
const KIND_STRUCT: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not BTF of this machine's byte order (magic {magic:#06x})")]
    Magic { path: String, magic: u16 },
    #[error("{path}: malformed BTF: {what}")]
    Malformed { path: String, what: String },
    #[error("{path}: no struct {name} (the kernel has no such structure, or names it differently)")]
    NoStruct { path: String, name: String },
    #[error("{path}: struct {strukt} has no member {member} (this kernel predates it, or renamed it)")]
    NoMember { path: String, strukt: String, member: String },
    #[error("{path}: struct {strukt}'s member {member} is a bitfield or not byte-aligned")]
    Unaligned { path: String, strukt: String, member: String },
}

/// The file's bytes: mapped where the kernel allows it, read otherwise.
enum Bytes {
    Mapped(Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Read(v) => v,
        }
    }
}

/// A BTF file: its type and string sections.
pub struct KernelBtf {
    path: String,
    data: Bytes,
    types: Range<usize>,
    strings: Range<usize>,
}

impl KernelBtf {
    /// Map and check the BTF at `path` (normally [`VMLINUX`]).
    pub fn open(path: &Path) -> Result<KernelBtf, BtfError> {
        let shown = path.display().to_string();
        let read = |source| BtfError::Read { path: shown.clone(), source };
        let file = File::open(path).map_err(read)?;
        // SAFETY: the file is read-only kernel data that does not change while the system runs;
        // a test's own file is not modified while mapped either.
        let data = match unsafe { MmapOptions::new().map_copy_read_only(&file) } {
            Ok(m) => Bytes::Mapped(m),
            Err(_) => Bytes::Read(std::fs::read(path).map_err(read)?),
        };
        KernelBtf::parse(shown, data)
    }

    fn parse(path: String, data: Bytes) -> Result<KernelBtf, BtfError> {
        let malformed = |what: &str| BtfError::Malformed { path: path.clone(), what: what.into() };
        if data.len() < HEADER_LEN {
            return Err(malformed("shorter than its header"));
        }
        let magic = u16::from_ne_bytes([data[0], data[1]]);
        if magic != MAGIC {
            return Err(BtfError::Magic { path, magic });
        }
        let word = |at: usize| u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let (hdr_len, type_off, type_len, str_off, str_len) = (word(4), word(8), word(12), word(16), word(20));
        let section = |off: usize, len: usize, what: &str| {
            let start = hdr_len.checked_add(off).ok_or_else(|| malformed(what))?;
            let end = start.checked_add(len).ok_or_else(|| malformed(what))?;
            if hdr_len < HEADER_LEN || end > data.len() {
                return Err(malformed(what));
            }
            Ok(start..end)
        };
        let types = section(type_off, type_len, "type section out of bounds")?;
        let strings = section(str_off, str_len, "string section out of bounds")?;
        Ok(KernelBtf { path, data, types, strings })
    }

    /// The byte offset of `member` in `struct strukt` (the first struct of that name).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let members = self.find_struct(strukt)?;
        for m in members.chunks_exact(TYPE_LEN) {
            let [name_off, _type, offset] = words(m);
            if self.name(name_off)? != member {
                continue;
            }
            // Without kind_flag the offset is in bits; with it the top byte is a bitfield's size.
            // Either way a plain member has a bit offset that is a whole number of bytes.
            let (bits, bitfield) = (offset & 0x00ff_ffff, offset >> 24);
            if bits % 8 != 0 || bitfield != 0 {
                return Err(BtfError::Unaligned {
                    path: self.path.clone(),
                    strukt: strukt.into(),
                    member: member.into(),
                });
            }
            return Ok(bits / 8);
        }
        Err(BtfError::NoMember { path: self.path.clone(), strukt: strukt.into(), member: member.into() })
    }

    /// The member records of the first struct named `name`.
    fn find_struct(&self, name: &str) -> Result<&[u8], BtfError> {
        let types = &self.data[self.types.clone()];
        let mut at = 0;
        while at < types.len() {
            let head = types.get(at..at + TYPE_LEN).ok_or_else(|| self.malformed("a type runs past its section"))?;
            let [name_off, info, _size] = words(head);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = extra_len(kind, vlen).ok_or_else(|| self.malformed(&format!("unknown type kind {kind}")))?;
            let body = types
                .get(at + TYPE_LEN..at + TYPE_LEN + extra)
                .ok_or_else(|| self.malformed("a type runs past its section"))?;
            if kind == KIND_STRUCT && self.name(name_off)? == name {
                return Ok(body);
            }
            at += TYPE_LEN + extra;
        }
        Err(BtfError::NoStruct { path: self.path.clone(), name: name.into() })
    }

    fn name(&self, off: u32) -> Result<&str, BtfError> {
        let strings = &self.data[self.strings.clone()];
        let rest = strings.get(off as usize..).ok_or_else(|| self.malformed("a name outside the string section"))?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| self.malformed("an unterminated name"))?;
        std::str::from_utf8(&rest[..end]).map_err(|_| self.malformed("a name that is not UTF-8"))
    }

    fn malformed(&self, what: &str) -> BtfError {
        BtfError::Malformed { path: self.path.clone(), what: what.into() }
    }
}

fn words(record: &[u8]) -> [u32; 3] {
    let w = |i: usize| u32::from_ne_bytes(record[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    [w(0), w(1), w(2)]
}

/// The bytes that follow a type's 12-byte head, by kind (the kernel's `include/uapi/linux/btf.h`).
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT: its encoding. VAR: its linkage. DECL_TAG: the component index.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY: element type, index type, length.
        3 => 12,
        // STRUCT, UNION: members. DATASEC: variables. ENUM64: values.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM: values. FUNC_PROTO: parameters.
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A file of its own in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(bytes: &[u8]) -> TempFile {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("warden-btf-test-{}-{n}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A BTF blob with the given types (head + extra bytes, already encoded) and string section.
    fn blob(types: &[u8], strings: &[u8]) -> TempFile {
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC.to_ne_bytes());
        header.extend_from_slice(&[1, 0]);
        for w in [HEADER_LEN as u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            header.extend_from_slice(&w.to_ne_bytes());
        }
        header.extend_from_slice(types);
        header.extend_from_slice(strings);
        TempFile::new(&header)
    }

    fn record(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// Strings: "" at 0, "int" at 1, "s" at 5, "a" at 7, "b" at 9, "bits" at 11.
    const STRINGS: &[u8] = b"\0int\0s\0a\0b\0bits\0";

    fn sample(kflag_bitfield: bool) -> TempFile {
        let mut types = Vec::new();
        // [1] int (4 bytes, 32 bits).
        types.extend(record(&[1, 1 << 24, 4, 32]));
        // [2] an enum of 2 values, to be skipped by its length.
        types.extend(record(&[0, (6 << 24) | 2, 4, 1, 0, 9, 1]));
        // [3] struct s { int a; int b; int bits:3 } (kind_flag when it has a bitfield).
        let kflag = if kflag_bitfield { 1 << 31 } else { 0 };
        let bits_offset = if kflag_bitfield { (3 << 24) | 64 } else { 64 };
        types.extend(record(&[5, kflag | (4 << 24) | 3, 12, 7, 1, 0, 9, 1, 32, 11, 1, bits_offset]));
        blob(&types, STRINGS)
    }

    #[test]
    fn finds_a_members_byte_offset_past_other_kinds() {
        let f = sample(false);
        let btf = KernelBtf::open(f.path()).unwrap();
        assert_eq!(btf.member_offset("s", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("s", "b").unwrap(), 4);
        assert_eq!(btf.member_offset("s", "bits").unwrap(), 8);
    }

    #[test]
    fn a_missing_struct_or_member_or_a_bitfield_is_named() {
        let f = sample(true);
        let btf = KernelBtf::open(f.path()).unwrap();
        let path = f.path().display().to_string();
        let err = btf.member_offset("t", "a").unwrap_err().to_string();
        assert_eq!(err, format!("{path}: no struct t (the kernel has no such structure, or names it differently)"));
        let err = btf.member_offset("s", "c").unwrap_err().to_string();
        assert_eq!(err, format!("{path}: struct s has no member c (this kernel predates it, or renamed it)"));
        let err = btf.member_offset("s", "bits").unwrap_err().to_string();
        assert_eq!(err, format!("{path}: struct s's member bits is a bitfield or not byte-aligned"));
        assert_eq!(btf.member_offset("s", "b").unwrap(), 4, "plain members of a kind_flag struct still resolve");
    }

    #[test]
    fn malformed_input_is_refused_not_misread() {
        let f = TempFile::new(b"not btf at all, but long enough");
        let err = KernelBtf::open(f.path()).err().unwrap().to_string();
        assert!(err.contains("not BTF of this machine's byte order"), "{err}");

        // A struct claiming more members than the section holds.
        let f = blob(&record(&[5, (4 << 24) | 40, 12]), STRINGS);
        let err = KernelBtf::open(f.path()).unwrap().member_offset("s", "a").unwrap_err().to_string();
        assert!(err.ends_with("malformed BTF: a type runs past its section"), "{err}");

        // An unknown kind.
        let f = blob(&record(&[5, 31 << 24, 0]), STRINGS);
        let err = KernelBtf::open(f.path()).unwrap().member_offset("s", "a").unwrap_err().to_string();
        assert!(err.ends_with("malformed BTF: unknown type kind 31"), "{err}");
    }

    /// The running kernel's own BTF, when it has one: the members the fast path reads.
    #[test]
    fn the_running_kernel_has_the_members_the_fast_path_reads() {
        let path = Path::new(VMLINUX);
        if !path.exists() {
            eprintln!("SKIPPING: {VMLINUX} does not exist (a kernel without BTF)");
            return;
        }
        let btf = KernelBtf::open(path).unwrap();
        let user_data = btf.member_offset("sock", "sk_user_data").unwrap();
        let queued = btf.member_offset("sk_psock", "msg_tot_len").unwrap();
        assert!(user_data > 0 && user_data.is_multiple_of(8), "sk_user_data at {user_data}");
        assert!(queued > 0 && queued.is_multiple_of(4), "msg_tot_len at {queued}");
    }
}

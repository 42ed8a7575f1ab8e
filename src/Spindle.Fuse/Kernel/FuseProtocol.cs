using System.Runtime.InteropServices;

namespace Spindle.Fuse.Kernel;

// The kernel's FUSE protocol (include/uapi/linux/fuse.h, protocol 7.x). Every message on /dev/fuse is one read()
// (a request) or one write() (a reply), in native byte order, and every structure is padded to 8 bytes. The
// structures below mirror the header field for field; their sizes are checked by the tests against the numbers the
// header implies, so a missing field cannot go unnoticed.
//
// A request, as read() returns it:
//
//   0        4        8                16               24      28      32      36    38    40
//   +--------+--------+----------------+----------------+-------+-------+-------+-----+-----+----------------
//   | len    | opcode | unique         | nodeid         | uid   | gid   | pid   |ext  | pad | opcode's argument
//   +--------+--------+----------------+----------------+-------+-------+-------+-----+-----+ (+ name / data)
//
// A reply, as write() sends it:
//
//   0        4        8                16
//   +--------+--------+----------------+------------------------------------
//   | len    | error  | unique         | opcode's result (only if error == 0)
//   +--------+--------+----------------+------------------------------------
//
// error is 0 or a negated errno; len counts the header too.

/// <summary>The request kinds this file system handles or answers (enum fuse_opcode).</summary>
internal enum FuseOpcode : uint
{
    Lookup = 1,
    Forget = 2,
    GetAttr = 3,
    SetAttr = 4,
    ReadLink = 5,
    Symlink = 6,
    MkNod = 8,
    MkDir = 9,
    Unlink = 10,
    RmDir = 11,
    Rename = 12,
    Link = 13,
    Open = 14,
    Read = 15,
    Write = 16,
    StatFs = 17,
    Release = 18,
    Fsync = 20,
    SetXAttr = 21,
    GetXAttr = 22,
    ListXAttr = 23,
    RemoveXAttr = 24,
    Flush = 25,
    Init = 26,
    OpenDir = 27,
    ReadDir = 28,
    ReleaseDir = 29,
    FsyncDir = 30,
    GetLk = 31,
    SetLk = 32,
    SetLkW = 33,
    Access = 34,
    Create = 35,
    Interrupt = 36,
    BMap = 37,
    Destroy = 38,
    IoCtl = 39,
    Poll = 40,
    NotifyReply = 41,
    BatchForget = 42,
    Fallocate = 43,
    ReadDirPlus = 44,
    Rename2 = 45,
    LSeek = 46,
    CopyFileRange = 47,
    SyncFs = 50,
    TmpFile = 51,
    Statx = 52,
}

/// <summary>FUSE_INIT flags (fuse_init_in/out.flags, and flags2 shifted down by 32).</summary>
[Flags]
internal enum FuseInitFlags : ulong
{
    None = 0,
    AsyncRead = 1UL << 0,
    AtomicOTrunc = 1UL << 3,
    BigWrites = 1UL << 5,
    AutoInvalData = 1UL << 12,
    AsyncDio = 1UL << 15,
    WritebackCache = 1UL << 16,
    ParallelDirOps = 1UL << 18,
    MaxPages = 1UL << 22,
    NoOpendirSupport = 1UL << 24,
    InitExt = 1UL << 30,

    /// <summary>FUSE_DIRECT_IO_ALLOW_MMAP (7.39): shared mmap of a FOPEN_DIRECT_IO file.</summary>
    DirectIoAllowMmap = 1UL << 36,
}

/// <summary>fuse_open_out.open_flags.</summary>
[Flags]
internal enum FuseOpenFlags : uint
{
    None = 0,

    /// <summary>Bypass the page cache: every read and write of this handle reaches the server.</summary>
    DirectIo = 1 << 0,

    /// <summary>Keep cached data on open.</summary>
    KeepCache = 1 << 1,

    /// <summary>Directory contents may be cached.</summary>
    CacheDir = 1 << 3,

    /// <summary>No FLUSH request on close (7.35).</summary>
    NoFlush = 1 << 5,

    /// <summary>Direct writes to this inode may run in parallel instead of under the inode lock (7.36).</summary>
    ParallelDirectWrites = 1 << 6,
}

/// <summary>fuse_setattr_in.valid.</summary>
[Flags]
internal enum FuseSetAttrValid : uint
{
    Mode = 1 << 0,
    Uid = 1 << 1,
    Gid = 1 << 2,
    Size = 1 << 3,
    ATime = 1 << 4,
    MTime = 1 << 5,
    Handle = 1 << 6,
    ATimeNow = 1 << 7,
    MTimeNow = 1 << 8,
    LockOwner = 1 << 9,
    CTime = 1 << 10,
    KillSuidGid = 1 << 11,
}

/// <summary>Protocol numbers: versions, sizes and the flags carried in open(2) flags.</summary>
internal static class FuseConstants
{
    public const uint KernelVersion = 7;

    /// <summary>
    /// The newest minor version this implementation speaks. Everything used past 7.31 (NOFLUSH, parallel direct
    /// writes, flags2, DIRECT_IO_ALLOW_MMAP) is negotiated by flag, so answering with min(kernel, this) is safe.
    /// </summary>
    public const uint MaxMinorVersion = 39;

    /// <summary>Below 7.31 the kernel lacks features the device relies on (max_pages came in 7.28, NOFLUSH in 7.35 is optional).</summary>
    public const uint MinMinorVersion = 28;

    public const ulong RootNodeId = 1;

    /// <summary>FUSE_NOTIFY_INVAL_INODE: sent in a header's error field with unique 0 (fuse.h, "notify codes").</summary>
    public const int NotifyInvalidateInode = 2;

    /// <summary>The kernel refuses a read() buffer smaller than this or than max_write plus the headers.</summary>
    public const int MinReadBuffer = 8192;

    /// <summary>Room reserved in every request buffer for the headers in front of the data of the largest WRITE.</summary>
    public const int HeaderRoom = 4096;

    // Bits of open(2) flags (asm-generic/fcntl.h, as on x86-64 and arm64).
    public const uint OAccessMode = 0x3;
    public const uint OWriteOnly = 0x1;
    public const uint OReadWrite = 0x2;
    public const uint OTrunc = 0x200;
    public const uint ODsync = 0x1000;
    public const uint ODirect = 0x4000;
    public const uint OSync = 0x101000;

    // fallocate(2) modes.
    public const uint FallocKeepSize = 0x01;
    public const uint FallocPunchHole = 0x02;
    public const uint FallocNoHideStale = 0x04;
    public const uint FallocZeroRange = 0x10;

    // lseek(2) whence.
    public const uint SeekData = 3;
    public const uint SeekHole = 4;

    public const uint FsyncFdatasync = 1;

    // st_mode file types.
    public const uint SIfReg = 0x8000;
    public const uint SIfDir = 0x4000;

    // readdir d_type.
    public const uint DtDir = 4;
    public const uint DtReg = 8;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseInHeader
{
    public const int Size = 40;

    public uint Length;
    public FuseOpcode Opcode;
    public ulong Unique;
    public ulong NodeId;
    public uint Uid;
    public uint Gid;
    public uint Pid;
    public ushort TotalExtLength;
    public ushort Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseOutHeader
{
    public const int Size = 16;

    public uint Length;
    public int Error;
    public ulong Unique;
}

/// <summary>
/// struct fuse_notify_inval_inode_out: the kernel drops its cached attributes of <see cref="NodeId"/>, and its cached
/// pages from <see cref="Offset"/> for <see cref="Length"/> bytes (0: to the end) unless the offset is negative.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct FuseNotifyInvalidateInode
{
    public const int Size = 24;

    public ulong NodeId;
    public long Offset;
    public long Length;
}

/// <summary>struct fuse_attr: what stat(2) shows.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct FuseAttr
{
    public const int Size = 88;

    public ulong Ino;
    public ulong FileSize;
    public ulong Blocks;
    public ulong ATime;
    public ulong MTime;
    public ulong CTime;
    public uint ATimeNsec;
    public uint MTimeNsec;
    public uint CTimeNsec;
    public uint Mode;
    public uint NLink;
    public uint Uid;
    public uint Gid;
    public uint RDev;
    public uint BlockSize;
    public uint Flags;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseEntryOut
{
    public const int Size = 40 + FuseAttr.Size;

    public ulong NodeId;
    public ulong Generation;
    public ulong EntryValid;
    public ulong AttrValid;
    public uint EntryValidNsec;
    public uint AttrValidNsec;
    public FuseAttr Attr;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseAttrOut
{
    public const int Size = 16 + FuseAttr.Size;

    public ulong AttrValid;
    public uint AttrValidNsec;
    public uint Dummy;
    public FuseAttr Attr;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseGetAttrIn
{
    public const int Size = 16;

    public uint GetAttrFlags;
    public uint Dummy;
    public ulong Handle;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseSetAttrIn
{
    public const int Size = 88;

    public FuseSetAttrValid Valid;
    public uint Padding;
    public ulong Handle;
    public ulong FileSize;
    public ulong LockOwner;
    public ulong ATime;
    public ulong MTime;
    public ulong CTime;
    public uint ATimeNsec;
    public uint MTimeNsec;
    public uint CTimeNsec;
    public uint Mode;
    public uint Unused4;
    public uint Uid;
    public uint Gid;
    public uint Unused5;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseOpenIn
{
    public const int Size = 8;

    public uint Flags;
    public uint OpenFlags;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseOpenOut
{
    public const int Size = 16;

    public ulong Handle;
    public FuseOpenFlags OpenFlags;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseReleaseIn
{
    public const int Size = 24;

    public ulong Handle;
    public uint Flags;
    public uint ReleaseFlags;
    public ulong LockOwner;
}

/// <summary>struct fuse_read_in; READDIR uses it too.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct FuseReadIn
{
    public const int Size = 40;

    public ulong Handle;
    public ulong Offset;
    public uint Length;
    public uint ReadFlags;
    public ulong LockOwner;
    public uint Flags;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseWriteIn
{
    public const int Size = 40;

    public ulong Handle;
    public ulong Offset;
    public uint Length;
    public uint WriteFlags;
    public ulong LockOwner;

    /// <summary>The file's open flags, with O_DSYNC/O_SYNC added for RWF_DSYNC/RWF_SYNC writes.</summary>
    public uint Flags;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseWriteOut
{
    public const int Size = 8;

    public uint Length;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseFsyncIn
{
    public const int Size = 16;

    public ulong Handle;
    public uint FsyncFlags;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseFallocateIn
{
    public const int Size = 32;

    public ulong Handle;
    public ulong Offset;
    public ulong Length;
    public uint Mode;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseLSeekIn
{
    public const int Size = 24;

    public ulong Handle;
    public ulong Offset;
    public uint Whence;
    public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseLSeekOut
{
    public const int Size = 8;

    public ulong Offset;
}

/// <summary>
/// struct fuse_init_in. Kernels before 7.36 send only the first 16 bytes; the rest is read only when present.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct FuseInitIn
{
    public const int Size = 64;
    public const int CompatSize = 16;

    public uint Major;
    public uint Minor;
    public uint MaxReadahead;
    public uint Flags;
    public uint Flags2;
    public uint Unused0;
    public uint Unused1;
    public uint Unused2;
    public uint Unused3;
    public uint Unused4;
    public uint Unused5;
    public uint Unused6;
    public uint Unused7;
    public uint Unused8;
    public uint Unused9;
    public uint Unused10;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseInitOut
{
    public const int Size = 64;

    public uint Major;
    public uint Minor;
    public uint MaxReadahead;
    public uint Flags;
    public ushort MaxBackground;
    public ushort CongestionThreshold;
    public uint MaxWrite;
    public uint TimeGranularity;
    public ushort MaxPages;
    public ushort MapAlignment;
    public uint Flags2;
    public uint Unused0;
    public uint Unused1;
    public uint Unused2;
    public uint Unused3;
    public uint Unused4;
    public uint Unused5;
    public uint Unused6;
}

[StructLayout(LayoutKind.Sequential)]
internal struct FuseStatFsOut
{
    public const int Size = 80;

    public ulong Blocks;
    public ulong BlocksFree;
    public ulong BlocksAvailable;
    public ulong Files;
    public ulong FilesFree;
    public uint BlockSize;
    public uint NameLength;
    public uint FragmentSize;
    public uint Padding;
    public uint Spare0;
    public uint Spare1;
    public uint Spare2;
    public uint Spare3;
    public uint Spare4;
    public uint Spare5;
}

/// <summary>struct fuse_dirent without its name: the name follows, padded to 8 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct FuseDirent
{
    public const int Size = 24;

    public ulong Ino;
    public ulong Offset;
    public uint NameLength;
    public uint Type;
}

// FUSE, loop devices and mount(2) are Linux's: so are these tests.
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]

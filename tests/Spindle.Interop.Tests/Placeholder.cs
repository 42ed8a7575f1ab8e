namespace Spindle.Interop.Tests;

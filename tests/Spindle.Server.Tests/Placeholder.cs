namespace Spindle.Server.Tests;

// warmstart's launcher for a Java command-line tool (`warmstart record --tool`).
//
//   java OPTIONS --add-modules jdk.incubator.foreign --enable-native-access=ALL-UNNAMED
//        -cp CP:LAUNCHER warmstart.launcher.JavaTool main CLASS CP -- ARGS...
//   ... -cp JAR:LAUNCHER warmstart.launcher.JavaTool jar JAR JAR -- ARGS...
//
// (the tool's `java -cp CP CLASS ARGS` and `java -jar JAR ARGS`). It loads the tool's main
// class, runs its `main` once per priming argument string (WARMSTART_TOOL_PRIME, JSON
// list; output to stderr, System.exit intercepted), tells warmstart every file the JVM
// loaded (WARMSTART_FILE=... lines on the notify fd) and that it is warm (READY=1): the
// snapshot is taken in its read of the notify fd. Each restored instance reads its run's
// request there (argv, cwd, environment, umask), puts them in place and runs `main` as
// the `java` launcher would: an exception out of `main` is the JVM's uncaught exception
// (exit status 1), a return waits for the tool's other threads like DestroyJavaVM.
//
// Java cannot change its working directory, umask or C environment: those calls go
// through the JDK 17 foreign-function API (jdk.incubator.foreign). The JDK's cached copies
// of the working directory and environment are updated through sun.misc.Unsafe, so the
// tool's code gets no more access to the JDK's internals than a cold start gives it.
package warmstart.launcher;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.PrintStream;
import java.lang.invoke.MethodHandle;
import java.lang.invoke.MethodType;
import java.lang.reflect.Field;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.jar.Attributes;
import java.util.jar.JarFile;
import jdk.incubator.foreign.CLinker;
import jdk.incubator.foreign.FunctionDescriptor;
import jdk.incubator.foreign.MemoryAddress;
import jdk.incubator.foreign.MemorySegment;
import jdk.incubator.foreign.ResourceScope;

public final class JavaTool {
    private JavaTool() {}

    // ---- libc through the foreign-function API ----------------------------------------

    private static final MethodHandle READ = libc("read", MethodType.methodType(long.class,
            int.class, MemoryAddress.class, long.class), FunctionDescriptor.of(CLinker.C_LONG,
            CLinker.C_INT, CLinker.C_POINTER, CLinker.C_LONG));
    private static final MethodHandle WRITE = libc("write", MethodType.methodType(long.class,
            int.class, MemoryAddress.class, long.class), FunctionDescriptor.of(CLinker.C_LONG,
            CLinker.C_INT, CLinker.C_POINTER, CLinker.C_LONG));
    private static final MethodHandle CLOSE = libc("close", MethodType.methodType(int.class,
            int.class), FunctionDescriptor.of(CLinker.C_INT, CLinker.C_INT));
    private static final MethodHandle DUP = libc("dup", MethodType.methodType(int.class,
            int.class), FunctionDescriptor.of(CLinker.C_INT, CLinker.C_INT));
    private static final MethodHandle DUP2 = libc("dup2", MethodType.methodType(int.class,
            int.class, int.class), FunctionDescriptor.of(CLinker.C_INT, CLinker.C_INT,
            CLinker.C_INT));
    private static final MethodHandle CHDIR = libc("chdir", MethodType.methodType(int.class,
            MemoryAddress.class), FunctionDescriptor.of(CLinker.C_INT, CLinker.C_POINTER));
    private static final MethodHandle UMASK = libc("umask", MethodType.methodType(int.class,
            int.class), FunctionDescriptor.of(CLinker.C_INT, CLinker.C_INT));
    private static final MethodHandle CLEARENV = libc("clearenv", MethodType.methodType(
            int.class), FunctionDescriptor.of(CLinker.C_INT));
    private static final MethodHandle SETENV = libc("setenv", MethodType.methodType(int.class,
            MemoryAddress.class, MemoryAddress.class, int.class), FunctionDescriptor.of(
            CLinker.C_INT, CLinker.C_POINTER, CLinker.C_POINTER, CLinker.C_INT));

    private static MethodHandle libc(String name, MethodType type, FunctionDescriptor desc) {
        MemoryAddress sym = CLinker.systemLookup().lookup(name)
                .orElseThrow(() -> new IllegalStateException("no " + name + " in libc"));
        return CLinker.getInstance().downcallHandle(sym, type, desc);
    }

    private static void writeAll(int fd, byte[] b) throws Throwable {
        try (ResourceScope scope = ResourceScope.newConfinedScope()) {
            MemorySegment seg = MemorySegment.allocateNative(Math.max(b.length, 1), scope);
            seg.copyFrom(MemorySegment.ofArray(b));
            long off = 0;
            while (off < b.length) {
                long n = (long) WRITE.invokeExact(fd, seg.address().addOffset(off),
                        (long) b.length - off);
                if (n <= 0) {
                    throw new IllegalStateException("writing to the notify channel failed");
                }
                off += n;
            }
        }
    }

    /** Up to `max` bytes read from `fd` (none at its end). */
    private static byte[] read(int fd, int max) throws Throwable {
        try (ResourceScope scope = ResourceScope.newConfinedScope()) {
            MemorySegment seg = MemorySegment.allocateNative(max, scope);
            long n;
            do {
                n = (long) READ.invokeExact(fd, seg.address(), (long) max);
            } while (n < 0 && errnoIsEintr());
            if (n < 0) {
                throw new IllegalStateException("reading the notify channel failed");
            }
            return seg.asSlice(0, n).toByteArray();
        }
    }

    private static boolean errnoIsEintr() {
        // The launcher's reads are not interrupted by handled signals (SA_RESTART); a
        // failed read is an error.
        return false;
    }

    private static String readLine(int fd) throws Throwable {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        while (true) {
            byte[] b = read(fd, 1);
            if (b.length == 0) {
                break;
            }
            out.write(b[0]);
            if (b[0] == '\n') {
                break;
            }
        }
        return out.toString(StandardCharsets.UTF_8);
    }

    private static byte[] readExact(int fd, int len) throws Throwable {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        while (out.size() < len) {
            byte[] b = read(fd, len - out.size());
            if (b.length == 0) {
                fail("the notify channel closed before the request");
            }
            out.write(b);
        }
        return out.toByteArray();
    }

    private static void fail(String why) {
        System.err.println("warmstart: " + why);
        System.out.flush();
        Runtime.getRuntime().halt(2);
    }

    // ---- the JDK's cached copies of the working directory and environment -------------

    private static final sun.misc.Unsafe U = unsafe();

    private static sun.misc.Unsafe unsafe() {
        try {
            Field f = sun.misc.Unsafe.class.getDeclaredField("theUnsafe");
            f.setAccessible(true);
            return (sun.misc.Unsafe) f.get(null);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("no sun.misc.Unsafe", e);
        }
    }

    /** Sets `field` of `obj` (a static one when `obj` is a Class). */
    @SuppressWarnings("deprecation")
    private static void put(Object obj, Class<?> cls, String field, Object value)
            throws ReflectiveOperationException {
        Field f = cls.getDeclaredField(field);
        if (Modifier.isStatic(f.getModifiers())) {
            U.putObjectVolatile(U.staticFieldBase(f), U.staticFieldOffset(f), value);
        } else {
            U.putObjectVolatile(obj, U.objectFieldOffset(f), value);
        }
    }

    @SuppressWarnings("deprecation")
    private static Object get(Object obj, Class<?> cls, String field)
            throws ReflectiveOperationException {
        Field f = cls.getDeclaredField(field);
        if (Modifier.isStatic(f.getModifiers())) {
            return U.getObjectVolatile(U.staticFieldBase(f), U.staticFieldOffset(f));
        }
        return U.getObjectVolatile(obj, U.objectFieldOffset(f));
    }

    private static void chdir(String dir) throws Throwable {
        try (ResourceScope scope = ResourceScope.newConfinedScope()) {
            int r = (int) CHDIR.invokeExact(CLinker.toCString(dir, scope).address());
            if (r != 0) {
                fail("cannot change to the run's working directory " + dir);
            }
        }
        System.setProperty("user.dir", dir);
        put(null, Class.forName("jdk.internal.util.StaticProperty"), "USER_DIR", dir);
        // java.io.File's file system resolves relative names against its copy.
        Object io = get(null, File.class, "fs");
        put(io, io.getClass(), "userDir", dir);
        // NIO's default file system: its default directory.
        Object nio = Path.of("").getFileSystem();
        Class<?> unixFs = Class.forName("sun.nio.fs.UnixFileSystem");
        put(nio, unixFs, "defaultDirectory", dir.getBytes(StandardCharsets.UTF_8));
    }

    private static void setEnv(Map<String, String> env) throws Throwable {
        int r = (int) CLEARENV.invokeExact();
        if (r != 0) {
            fail("clearenv failed");
        }
        try (ResourceScope scope = ResourceScope.newConfinedScope()) {
            for (Map.Entry<String, String> e : env.entrySet()) {
                int s = (int) SETENV.invokeExact(CLinker.toCString(e.getKey(), scope).address(),
                        CLinker.toCString(e.getValue(), scope).address(), 1);
                if (s != 0) {
                    fail("cannot set the environment variable " + e.getKey());
                }
            }
        }
        // System.getenv's map: java.lang.ProcessEnvironment.theEnvironment (Variable ->
        // Value, each a string and its bytes), which System.getenv() views.
        Class<?> pe = Class.forName("java.lang.ProcessEnvironment");
        @SuppressWarnings("unchecked")
        Map<Object, Object> the = (Map<Object, Object>) get(null, pe, "theEnvironment");
        Class<?> var = Class.forName("java.lang.ProcessEnvironment$Variable");
        Class<?> val = Class.forName("java.lang.ProcessEnvironment$Value");
        Class<?> ext = Class.forName("java.lang.ProcessEnvironment$ExternalData");
        the.clear();
        for (Map.Entry<String, String> e : env.entrySet()) {
            the.put(external(var, ext, e.getKey()), external(val, ext, e.getValue()));
        }
    }

    private static Object external(Class<?> cls, Class<?> ext, String s) throws Throwable {
        Object o = U.allocateInstance(cls);
        put(o, ext, "str", s);
        put(o, ext, "bytes", s.getBytes());
        return o;
    }

    // ---- the request: a JSON object {args, cwd, env, umask} ---------------------------

    private static final class Json {
        private final String s;
        private int i;

        Json(String s) {
            this.s = s;
        }

        Object value() {
            ws();
            char c = s.charAt(i);
            if (c == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++;
                ws();
                if (s.charAt(i) == '}') {
                    i++;
                    return m;
                }
                while (true) {
                    ws();
                    String k = string();
                    ws();
                    expect(':');
                    m.put(k, value());
                    ws();
                    if (s.charAt(i++) == '}') {
                        return m;
                    }
                }
            } else if (c == '[') {
                List<Object> l = new ArrayList<>();
                i++;
                ws();
                if (s.charAt(i) == ']') {
                    i++;
                    return l;
                }
                while (true) {
                    l.add(value());
                    ws();
                    if (s.charAt(i++) == ']') {
                        return l;
                    }
                }
            } else if (c == '"') {
                return string();
            } else {
                int start = i;
                while (i < s.length() && "-0123456789".indexOf(s.charAt(i)) >= 0) {
                    i++;
                }
                return Long.parseLong(s.substring(start, i));
            }
        }

        private void ws() {
            while (i < s.length() && Character.isWhitespace(s.charAt(i))) {
                i++;
            }
        }

        private void expect(char c) {
            if (s.charAt(i++) != c) {
                throw new IllegalArgumentException("bad request at " + (i - 1));
            }
        }

        private String string() {
            expect('"');
            StringBuilder b = new StringBuilder();
            while (true) {
                char c = s.charAt(i++);
                if (c == '"') {
                    return b.toString();
                }
                if (c != '\\') {
                    b.append(c);
                    continue;
                }
                char e = s.charAt(i++);
                switch (e) {
                    case 'n': b.append('\n'); break;
                    case 't': b.append('\t'); break;
                    case 'r': b.append('\r'); break;
                    case 'b': b.append('\b'); break;
                    case 'f': b.append('\f'); break;
                    case 'u':
                        b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                        i += 4;
                        break;
                    default: b.append(e);
                }
            }
        }
    }

    // ---- running the tool's main ------------------------------------------------------

    /** Thrown by System.exit while priming. */
    private static final class Exit extends SecurityException {
        private static final long serialVersionUID = 1L;
        final int status;

        Exit(int status) {
            super("System.exit(" + status + ") while warmstart primed the tool");
            this.status = status;
        }
    }

    /** The tool's exception with the launcher's frames (below `main`) left out. */
    private static Throwable own(Throwable t, String mainClass) {
        StackTraceElement[] st = t.getStackTrace();
        for (int k = st.length - 1; k >= 0; k--) {
            if (st[k].getClassName().equals(mainClass) && st[k].getMethodName().equals("main")) {
                t.setStackTrace(java.util.Arrays.copyOf(st, k + 1));
                break;
            }
        }
        return t;
    }

    /** A priming run of `main`: its exit status. */
    private static int prime(Method main, String mainClass, String[] args) {
        try {
            main.invoke(null, (Object) args);
            return 0;
        } catch (InvocationTargetException e) {
            Throwable c = e.getCause();
            if (c instanceof Exit) {
                return ((Exit) c).status;
            }
            System.err.print("Exception in thread \"main\" ");
            own(c, mainClass).printStackTrace();
            return 1;
        } catch (ReflectiveOperationException e) {
            e.printStackTrace();
            return 1;
        }
    }

    /** Words of a priming argument string: whitespace-separated, '…' and "…" quote. */
    private static String[] split(String s) {
        List<String> out = new ArrayList<>();
        java.util.regex.Matcher m =
                java.util.regex.Pattern.compile("'([^']*)'|\"([^\"]*)\"|(\\S+)").matcher(s);
        while (m.find()) {
            out.add(m.group(1) != null ? m.group(1) : m.group(2) != null ? m.group(2)
                    : m.group(3));
        }
        return out.toArray(new String[0]);
    }

    @SuppressWarnings("removal")
    private static void primeAll(Method main, String mainClass, List<Object> primes)
            throws Throwable {
        if (primes.isEmpty()) {
            return;
        }
        PrintStream err = System.err;
        // setSecurityManager warns on System.err that it is deprecated: not the tool's
        // output.
        System.setErr(new PrintStream(PrintStream.nullOutputStream()));
        try {
            System.setSecurityManager(new SecurityManager() {
                @Override
                public void checkPermission(java.security.Permission p) {}

                @Override
                public void checkPermission(java.security.Permission p, Object ctx) {}

                @Override
                public void checkExit(int status) {
                    throw new Exit(status);
                }
            });
        } catch (UnsupportedOperationException e) {
            System.setErr(err);
            fail("--prime-args needs System.exit intercepted, which this JVM does not allow");
        } finally {
            System.setErr(err);
        }
        try {
            for (Object p : primes) {
                System.out.flush();
                int out = (int) DUP.invokeExact(1);
                int r = (int) DUP2.invokeExact(2, 1);
                int code;
                java.util.Set<Thread> before = Thread.getAllStackTraces().keySet();
                try {
                    code = prime(main, mainClass, split((String) p));
                    if (code == 0) {
                        // As at a cold start's end: the tool's other threads finish first.
                        awaitThreads(before, p);
                    }
                } finally {
                    System.out.flush();
                    r = (int) DUP2.invokeExact(out, 1);
                    r = (int) CLOSE.invokeExact(out);
                }
                System.err.println("warmstart: primed with '" + p + "': exit status " + code);
            }
        } finally {
            System.setSecurityManager(null);
        }
    }

    /** Waits (10 s at most) for the non-daemon threads started since `before` to end. */
    private static void awaitThreads(java.util.Set<Thread> before, Object prime)
            throws InterruptedException {
        long deadline = System.nanoTime() + 10_000_000_000L;
        for (Thread t : Thread.getAllStackTraces().keySet()) {
            if (before.contains(t) || t.isDaemon() || t == Thread.currentThread()) {
                continue;
            }
            long left = (deadline - System.nanoTime()) / 1_000_000;
            if (left > 0) {
                t.join(left);
            }
            if (t.isAlive()) {
                fail("the priming run '" + prime + "' left thread \"" + t.getName()
                        + "\" running 10 s after its main returned; a cold run would wait "
                        + "for it: prime with other arguments");
            }
        }
    }

    /** Every file the JVM loaded: its executable, mapped files, open files, class path. */
    private static TreeSet<String> loadedFiles(String classPath) {
        TreeSet<String> files = new TreeSet<>();
        try {
            files.add(Path.of("/proc/self/exe").toRealPath().toString());
            for (String line : Files.readAllLines(Path.of("/proc/self/maps"))) {
                int slash = line.indexOf('/');
                if (slash > 0 && !line.endsWith(" (deleted)")) {
                    files.add(line.substring(slash));
                }
            }
            try (var fds = Files.list(Path.of("/proc/self/fd"))) {
                fds.forEach(fd -> {
                    try {
                        String t = Files.readSymbolicLink(fd).toString();
                        if (t.startsWith("/")) {
                            files.add(t);
                        }
                    } catch (Exception e) {
                        // Gone meanwhile (the listing's own fd).
                    }
                });
            }
        } catch (Exception e) {
            fail("listing the files the JVM loaded: " + e);
        }
        for (String entry : classPath.split(File.pathSeparator)) {
            Path p = Path.of(entry.isEmpty() ? "." : entry).toAbsolutePath();
            if (Files.isDirectory(p)) {
                // Classes load from a directory one file at a time: any of them.
                try (var walk = Files.walk(p)) {
                    walk.filter(Files::isRegularFile).limit(100_000)
                            .forEach(f -> files.add(f.toString()));
                } catch (Exception e) {
                    fail("listing class path directory " + p + ": " + e);
                }
            } else {
                files.add(p.toString());
            }
        }
        files.removeIf(f -> f.contains("\n") || f.startsWith("/proc/") || f.startsWith("/dev/")
                || f.startsWith("/tmp/hsperfdata_") || !Files.isRegularFile(Path.of(f)));
        return files;
    }

    public static void main(String[] argv) throws Throwable {
        // main CLASS CP -- ARGS | jar JAR CP -- ARGS
        if (argv.length < 4 || !argv[3].equals("--")
                || !(argv[0].equals("main") || argv[0].equals("jar"))) {
            fail("bad launcher arguments");
        }
        String mode = argv[0];
        String target = argv[1];
        String classPath = argv[2];
        String[] recorded = java.util.Arrays.copyOfRange(argv, 4, argv.length);
        Map<String, String> env = new HashMap<>(System.getenv());
        int fd = Integer.parseInt(env.remove("WARMSTART_NOTIFY_FD"));
        env.remove("NOTIFY_SOCKET");
        String primeJson = env.remove("WARMSTART_TOOL_PRIME");
        setEnv(env);
        @SuppressWarnings("unchecked")
        List<Object> primes = primeJson == null ? List.of()
                : (List<Object>) new Json(primeJson).value();

        String mainClass = target;
        if (mode.equals("jar")) {
            try (JarFile jar = new JarFile(target)) {
                Attributes a = jar.getManifest() == null ? null
                        : jar.getManifest().getMainAttributes();
                mainClass = a == null ? null : a.getValue("Main-Class");
                if (mainClass == null) {
                    fail("no main manifest attribute, in " + target);
                }
                for (String k : new String[] {"Launcher-Agent-Class", "Add-Opens",
                        "Add-Exports", "Enable-Native-Access"}) {
                    if (a.getValue(k) != null) {
                        fail(target + " has a " + k + " manifest attribute, which only "
                                + "`java -jar` applies: record it without --tool");
                    }
                }
            }
        }
        // What a cold start shows the tool.
        System.setProperty("java.class.path", classPath);
        Method main;
        try {
            Class<?> c = Class.forName(mainClass, false, ClassLoader.getSystemClassLoader());
            main = c.getMethod("main", String[].class);
            if (!Modifier.isStatic(main.getModifiers())
                    || main.getReturnType() != void.class) {
                throw new NoSuchMethodException();
            }
        } catch (ClassNotFoundException e) {
            fail("could not find or load main class " + mainClass);
            return;
        } catch (NoSuchMethodException e) {
            fail("main method not found in class " + mainClass
                    + ", please define it as: public static void main(String[] args)");
            return;
        }
        String command = mode.equals("jar") ? target : mainClass;
        primeAll(main, mainClass, primes);

        StringBuilder msg = new StringBuilder();
        for (String f : loadedFiles(classPath)) {
            msg.append("WARMSTART_FILE=").append(f).append('\n');
        }
        msg.append("READY=1\n");
        System.out.flush();
        System.err.flush();
        writeAll(fd, msg.toString().getBytes(StandardCharsets.UTF_8));
        // The snapshot is taken in this read.
        String reply = readLine(fd);
        String[] args = recorded;
        if (reply.startsWith("RESTORED=1")) {
            String head = readLine(fd);
            if (!head.startsWith("TOOL ")) {
                fail("unexpected request " + head);
            }
            int len = Integer.parseInt(head.substring(5).trim());
            String body = new String(readExact(fd, len), StandardCharsets.UTF_8);
            int r = (int) CLOSE.invokeExact(fd);
            @SuppressWarnings("unchecked")
            Map<String, Object> req = (Map<String, Object>) new Json(body).value();
            chdir((String) req.get("cwd"));
            Map<String, String> runEnv = new LinkedHashMap<>();
            @SuppressWarnings("unchecked")
            Map<String, Object> e = (Map<String, Object>) req.get("env");
            e.forEach((k, v) -> runEnv.put(k, (String) v));
            setEnv(runEnv);
            r = (int) UMASK.invokeExact((int) (long) (Long) req.get("umask"));
            @SuppressWarnings("unchecked")
            List<Object> a = (List<Object>) req.get("args");
            args = a.stream().map(String.class::cast).toArray(String[]::new);
        }
        // Left running after the record: the recorded arguments.
        System.setProperty("sun.java.command",
                String.join(" ", java.util.stream.Stream.concat(
                        java.util.stream.Stream.of(command), java.util.Arrays.stream(args))
                        .toArray(String[]::new)));
        try {
            main.invoke(null, (Object) args);
        } catch (InvocationTargetException e) {
            // The JVM reports it as a cold start's uncaught exception (exit status 1).
            throw own(e.getCause(), mainClass);
        }
    }
}

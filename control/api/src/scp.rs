//! What a legacy scp exec (`scp -t …`, `scp -f …`) asks of the target, read from its command
//! line the way the target's shell and scp read it. The one reading both the channel's kind
//! ([`ChannelKind::of_exec`](crate::conditions::ChannelKind::of_exec): which grant applies)
//! and the relay's transfer tap (what is audited) use, so the two cannot disagree.

/// Direction of a legacy scp exec, seen from the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScpMode {
    /// `scp -t`: the target receives (the user uploads).
    Upload,
    /// `scp -f`: the target sends (the user downloads).
    Download,
}

/// A legacy scp exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScpCommand {
    /// Upload or download.
    pub mode: ScpMode,
    /// `-d`: the path names a directory (several files are sent).
    pub into_dir: bool,
    /// The operands (the path), joined by spaces.
    pub path: String,
}

/// scp's options that take an argument (OpenSSH's `getopt` string): their argument is the rest
/// of the word or the next word, never a flag.
const WITH_ARGUMENT: &str = "DFJMPSXcilo";

impl ScpCommand {
    /// The scp exec `command` is, when it runs `scp` (any path) with `-t` or `-f`. Options are
    /// looked for among every word, as a `getopt` that permutes its arguments would, so a flag
    /// after an operand still counts; `-f` wins over `-t`, as in scp.
    ///
    /// Only a line the shell runs as that one scp counts: the program is `scp` as scp clients
    /// send it (or scp's system path), and nothing in the line makes the shell run anything
    /// else (no `;`, `|`, `&`, redirection, subshell, substitution or line break). Any other
    /// line is an exec, decided and audited as one: `scp -t x; sh` under a grant for scp alone
    /// would otherwise run a shell.
    pub fn parse(command: &str) -> Option<ScpCommand> {
        let words = plain_words(command)?;
        let (prog, args) = words.split_first()?;
        if !matches!(prog.as_str(), "scp" | "/usr/bin/scp" | "/bin/scp") {
            return None;
        }
        let (mut to, mut from, mut into_dir) = (false, false, false);
        let mut operands = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--" {
                operands.extend(it.by_ref().cloned());
                break;
            }
            let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
                operands.push(a.clone());
                continue;
            };
            for (i, c) in flags.char_indices() {
                if WITH_ARGUMENT.contains(c) {
                    // its argument: the rest of this word, or the next one
                    if i + c.len_utf8() == flags.len() {
                        it.next();
                    }
                    break;
                }
                to |= c == 't';
                from |= c == 'f';
                into_dir |= c == 'd';
            }
        }
        let mode = if from {
            ScpMode::Download
        } else if to {
            ScpMode::Upload
        } else {
            return None;
        };
        Some(ScpCommand {
            mode,
            into_dir,
            path: operands.join(" "),
        })
    }
}

/// Characters that, unquoted, make a POSIX shell do more than run one program with words.
const UNQUOTED_SPECIAL: &[char] = &[';', '|', '&', '<', '>', '(', ')', '$', '`', '\n', '\r'];

/// The words of a line that runs one program and nothing else: `None` where the shell
/// would also run, expand or redirect something (an unquoted [`UNQUOTED_SPECIAL`], or `$` or a
/// backquote inside double quotes).
fn plain_words(cmd: &str) -> Option<Vec<String>> {
    words(cmd, true)
}

/// Words of a command line as a POSIX shell splits them (quotes and backslashes; nothing
/// expanded); with `plain`, `None` for a line that is more than one program and its words.
fn words(cmd: &str, plain: bool) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut any = false;
    let mut it = cmd.chars();
    while let Some(c) = it.next() {
        match c {
            c if plain && UNQUOTED_SPECIAL.contains(&c) => return None,
            '\'' => {
                any = true;
                for c in it.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                any = true;
                while let Some(c) = it.next() {
                    match c {
                        '"' => break,
                        '\\' => match it.next() {
                            Some(n @ ('"' | '\\' | '$' | '`')) => cur.push(n),
                            Some(n) => {
                                cur.push('\\');
                                cur.push(n);
                            }
                            None => cur.push('\\'),
                        },
                        '$' | '`' if plain => return None,
                        _ => cur.push(c),
                    }
                }
            }
            '\\' => {
                any = true;
                if let Some(n) = it.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(c: &str) -> Option<ScpMode> {
        ScpCommand::parse(c).map(|s| s.mode)
    }

    #[test]
    fn scp_execs_are_read_as_the_shell_and_scp_read_them() {
        assert_eq!(
            words("a\\ b 'c'd \"\"", false),
            Some(vec!["a b".into(), "cd".into(), String::new()])
        );
        assert_eq!(mode("scp -t /tmp"), Some(ScpMode::Upload));
        assert_eq!(mode("/usr/bin/scp -f x"), Some(ScpMode::Download));
        assert_eq!(mode("/bin/scp -f x"), Some(ScpMode::Download));
        assert_eq!(mode("scpx -t"), None);
        assert_eq!(mode("ls -t"), None);
        assert_eq!(mode("scp x"), None);
        // what a shell makes of quotes and backslashes
        assert_eq!(mode("'scp' -t /tmp/x"), Some(ScpMode::Upload));
        assert_eq!(mode("s\\cp \"-t\" /tmp/x"), Some(ScpMode::Upload));
        // an option's argument is no flag, and a flag after it or after an operand still is
        assert_eq!(mode("scp -l t -t /x"), Some(ScpMode::Upload));
        assert_eq!(mode("scp -lt /x"), None);
        assert_eq!(mode("scp -o f=1 /x -t"), Some(ScpMode::Upload));
        // a line that runs more than that one scp is an exec
        for line in [
            "scp -t x; sh -c id",
            "scp -t x && id",
            "scp -t x | sh",
            "scp -t x > /tmp/y",
            "scp -t $(id)",
            "scp -t \"`id`\"",
            "scp -t \"$(id)\"",
            "scp -t x\nid",
            "scp -t (x)",
            "~/bin/scp -t x",
            "./scp -t x",
        ] {
            assert_eq!(mode(line), None, "{line}");
        }
        // quoted, those characters are words like any other
        let s = ScpCommand::parse("scp -t '/tmp/a;b$(c)'").expect("scp");
        assert_eq!(s.path, "/tmp/a;b$(c)");
        assert_eq!(words("a;b", false), Some(vec!["a;b".into()]));
        // -f wins, as in scp
        assert_eq!(mode("scp -t -f x"), Some(ScpMode::Download));
        let s = ScpCommand::parse("scp -v -d -t -- '/tmp/a b'").expect("scp");
        assert_eq!(
            (s.mode, s.path.as_str(), s.into_dir),
            (ScpMode::Upload, "/tmp/a b", true)
        );
        let s = ScpCommand::parse("/usr/bin/scp -r -f \"/srv/x\\\"y\" ").expect("scp");
        assert_eq!((s.mode, s.path.as_str()), (ScpMode::Download, "/srv/x\"y"));
    }
}

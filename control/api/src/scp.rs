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
    /// The scp exec `command` is, when it runs `scp` with `-t` or `-f`, read as the target's
    /// scp reads its arguments: OpenSSH's own (BSD) `getopt`, whose options end at the first
    /// word that is not one (or at `--`), an option's argument being the rest of its word or
    /// the next word; `-f` wins over `-t`.
    ///
    /// Only a line the shell runs as that one scp counts: the program is `scp` as scp clients
    /// send it (or scp's system path), and nothing in the line makes the shell run anything
    /// else or read it otherwise than psm (no `;`, `|`, `&`, redirection, subshell,
    /// substitution, comment, line break, backslash-joined line or control character), nor
    /// turns the options into other words (an unquoted `*`, `?`, `[` or `{` in the program, an
    /// option or an option's argument, or, for an upload without `--`, at the start of the
    /// first operand, where a file named like an option would become one). Any other line is an exec, decided and
    /// audited as one: `scp -t x; sh`, or `scp -o 'ProxyCommand=…' x:y -t` (a client copy
    /// that starts ssh), under a grant for scp alone would otherwise run what it likes.
    pub fn parse(command: &str) -> Option<ScpCommand> {
        let words = plain_words(command)?;
        let ((prog, prog_glob), args) = words.split_first()?;
        if *prog_glob || !matches!(prog.as_str(), "scp" | "/usr/bin/scp" | "/bin/scp") {
            return None;
        }
        let (mut to, mut from, mut into_dir) = (false, false, false);
        let mut i = 0;
        let mut dashes = false;
        while let Some((a, glob)) = args.get(i) {
            if a == "--" {
                i += 1;
                dashes = true;
                break;
            }
            let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
                break; // the first operand
            };
            if *glob {
                return None;
            }
            i += 1;
            for (at, c) in flags.char_indices() {
                if WITH_ARGUMENT.contains(c) {
                    // its argument: the rest of this word, or the next one
                    if at + c.len_utf8() == flags.len() {
                        let (_, glob) = args.get(i)?;
                        if *glob {
                            return None;
                        }
                        i += 1;
                    }
                    break;
                }
                to |= c == 't';
                from |= c == 'f';
                into_dir |= c == 'd';
            }
        }
        let operands = &args[i.min(args.len())..];
        // (after `--` every word is a file name, whatever it expands to; and once `-f` is
        // among the options, it wins over whatever a glob could add)
        if !dashes
            && !from
            && operands
                .first()
                .is_some_and(|(w, glob)| *glob && w.starts_with(['*', '?', '[', '{']))
        {
            return None;
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
            path: operands
                .iter()
                .map(|(w, _)| w.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

/// Characters that, unquoted, make a POSIX shell do more than run one program with words.
const UNQUOTED_SPECIAL: &[char] = &[';', '|', '&', '<', '>', '(', ')', '$', '`', '\n', '\r'];

/// Characters that, unquoted, the shell expands into other words (globs, bash's braces).
const UNQUOTED_EXPANDS: &[char] = &['*', '?', '[', '{'];

/// The words of a line that runs one program and nothing else: `None` where the shell
/// would also run, expand or redirect something (an unquoted [`UNQUOTED_SPECIAL`], or `$` or a
/// backquote inside double quotes); each word says whether it holds an unquoted
/// [`UNQUOTED_EXPANDS`].
fn plain_words(cmd: &str) -> Option<Vec<(String, bool)>> {
    words(cmd, true)
}

/// Words of a command line as a POSIX shell splits them (quotes and backslashes; nothing
/// expanded), each with whether it holds an unquoted [`UNQUOTED_EXPANDS`]; with `plain`,
/// `None` for a line that is more than one program and its words.
fn words(cmd: &str, plain: bool) -> Option<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut any = false;
    let mut glob = false;
    let mut it = cmd.chars();
    while let Some(c) = it.next() {
        match c {
            c if plain && UNQUOTED_SPECIAL.contains(&c) => return None,
            // a comment: the shell ignores the rest of the line (up to a line break, where a
            // backslash does not join it), which psm would read as words
            '#' if plain && !any && cur.is_empty() => return None,
            // the shell splits words on spaces and tabs only: any other control character
            // would be one word to it and a separator (or a character) to psm
            c if plain && c.is_control() && c != ' ' && c != '\t' => return None,
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
                            Some('\n' | '\r') if plain => return None,
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
                match it.next() {
                    // backslash and line break: the shell joins the lines
                    Some('\n' | '\r') if plain => return None,
                    Some(n) => cur.push(n),
                    None => {}
                }
            }
            ' ' | '\t' => {
                if any || !cur.is_empty() {
                    out.push((std::mem::take(&mut cur), glob));
                    any = false;
                    glob = false;
                }
            }
            c => {
                glob |= UNQUOTED_EXPANDS.contains(&c);
                cur.push(c);
            }
        }
    }
    if any || !cur.is_empty() {
        out.push((cur, glob));
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
            words("a\\ b 'c'd \"\" x* '*'", false),
            Some(vec![
                ("a b".into(), false),
                ("cd".into(), false),
                (String::new(), false),
                ("x*".into(), true),
                ("*".into(), false)
            ])
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
        // an option's argument is no flag; options end at the first operand, as in scp's
        // getopt: a -t after it is a file name, and that scp is a client copy
        assert_eq!(mode("scp -l t -t /x"), Some(ScpMode::Upload));
        assert_eq!(mode("scp -lt /x"), None);
        assert_eq!(mode("scp -o f=1 /x -t"), None);
        assert_eq!(
            mode("scp -o 'ProxyCommand=sh -c \"id>/tmp/p\"' x:y -t"),
            None
        );
        assert_eq!(mode("scp -t"), Some(ScpMode::Upload));
        assert_eq!(mode("scp -l"), None);
        // words the shell would expand into other options are not read as options
        for line in [
            "scp -*t h:y z",
            "scp -t -l * x",
            "scp -{t,o} x",
            "scp -t *",
            "sc? -t x",
        ] {
            assert_eq!(mode(line), None, "{line}");
        }
        // a glob later in a path is the target's to expand
        assert_eq!(mode("scp -f /var/log/*.log"), Some(ScpMode::Download));
        assert_eq!(mode("scp -f -- *.txt"), Some(ScpMode::Download));
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
        assert_eq!(words("a;b", false), Some(vec![("a;b".into(), false)]));
        // what the shell reads otherwise than psm would: comments, joined lines, separators
        for line in [
            "scp -t x #\\\nsh -c id",
            "scp -i\\\n -t '-oProxyCommand=id' h:x /tmp/y",
            "scp -t \"x\\\n\"",
            "scp '-oProxyCommand=id;'\x0c-t h:x /tmp/y",
            "scp\x0b-t x",
            "scp -t x\r",
        ] {
            assert_eq!(mode(line), None, "{line:?}");
        }
        // a '#' inside a word is a character, and tabs separate words
        assert_eq!(
            ScpCommand::parse("scp\t-t\t/tmp/a#b").map(|s| s.path),
            Some("/tmp/a#b".into())
        );
        // a download's leading glob: -f wins whatever it expands to (OpenSSH's scp -O sends
        // `scp -f *.log` for 'host:*.log')
        assert_eq!(mode("scp -f *.log"), Some(ScpMode::Download));
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

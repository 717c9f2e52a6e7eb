// Nothing beyond CTFd's own update form (its scoring selector shows and
// hides initial/decay/minimum itself).
CTFd.plugin.run(function (_CTFd) {});
